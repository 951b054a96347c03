/* SPDX-License-Identifier: Apache-2.0 */
/* splitmix64's finaliser, shared by the programs: spreads sequential or
 * clustered inputs (socket cookies, client address and port) over 32 bits. */
#ifndef MESH_MIX_H
#define MESH_MIX_H

static __always_inline __u32 mix64(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return (__u32)x;
}

#endif /* MESH_MIX_H */
