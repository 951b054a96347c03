# A token service as Docker's registries use (distribution's `auth: token`), for tests.
#
#   python3 tokenserver.py DIR USER PASSWORD ADDR PORT ISSUER
#
# `GET /token` with USER:PASSWORD as basic credentials answers a JWT (RS256, signed with
# `openssl dgst` by DIR/token.key, its certificate DIR/token.crt in `x5c`) granting the scopes
# asked for; anonymous callers get one granting nothing; wrong credentials get 401. Served over
# HTTPS on ADDR:PORT with DIR/server.crt and DIR/server.key (the registry's certificate).
import base64,http.server,json,ssl,subprocess,sys,time,urllib.parse
d,user,pw,addr,port,issuer=sys.argv[1:7]
der=subprocess.run(['openssl','x509','-in',d+'/token.crt','-outform','DER'],capture_output=True,check=True).stdout
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b'=').decode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        q=urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        auth=self.headers.get('Authorization')
        good='Basic '+base64.b64encode((user+':'+pw).encode()).decode()
        if auth is not None and auth!=good:
            self.send_response(401); self.send_header('Content-Length','0'); self.end_headers(); return
        access=[]
        for sc in q.get('scope',[]):
            t,name,acts=sc.split(':')
            access.append({'type':t,'name':name,'actions':acts.split(',') if auth else []})
        now=int(time.time())
        head={'alg':'RS256','typ':'JWT','x5c':[base64.b64encode(der).decode()]}
        claims={'iss':issuer,'sub':user if auth else '','aud':q.get('service',[''])[0],'exp':now+300,'nbf':now-10,'iat':now,'jti':str(time.time_ns()),'access':access}
        signing=b64(json.dumps(head).encode())+'.'+b64(json.dumps(claims).encode())
        sig=subprocess.run(['openssl','dgst','-sha256','-sign',d+'/token.key'],input=signing.encode(),capture_output=True,check=True).stdout
        tok=signing+'.'+b64(sig)
        body=json.dumps({'token':tok,'access_token':tok,'expires_in':300}).encode()
        self.send_response(200); self.send_header('Content-Type','application/json'); self.send_header('Content-Length',str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self,*a): pass
s=http.server.HTTPServer((addr,int(port)),H)
c=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain(d+'/server.crt',d+'/server.key')
s.socket=c.wrap_socket(s.socket,server_side=True)
s.serve_forever()
