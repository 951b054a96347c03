//! The conversion of whole files: Docker's recorded stack, the seed examples (httpd,
//! portainer, traefik), overrides, interpolation, and the one-line refusals.

use std::collections::BTreeMap;

use mesh_api::{
    BlobKind, EndpointMode, FailureAction, MountType, Protocol, PublishMode, RestartCondition,
    ServiceMode, ServiceSpec, UpdateOrder,
};

use crate::{load, Error, Options, Source, Stack};

fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn opts(ns: &str, vars: &[(&str, &str)]) -> Options {
    Options {
        namespace: ns.into(),
        base_dir: "/srv/app".into(),
        env: env(vars),
    }
}

fn one(text: &str) -> Result<Stack, Error> {
    load(
        &[Source {
            name: "compose.yml".into(),
            text: text.into(),
        }],
        &opts("demo", &[]),
    )
}

fn err(text: &str) -> String {
    one(text).unwrap_err().to_string()
}

fn svc<'a>(s: &'a Stack, name: &str) -> &'a ServiceSpec {
    s.services
        .iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("no service {name} in {:?}", s.services))
}

/// Docker's own recorded example (`docs/engine-api/requests/stack-compose.yml`), less what
/// mesh refuses (placement preferences, reservations, ...), with the specs Docker's CLI sent.
const DEMO: &str = r#"
version: "3.8"
services:
  web:
    image: nginx:1.25-alpine
    command: ["nginx", "-g", "daemon off;"]
    ports:
      - "8080:80"
      - target: 443
        published: 8443
        protocol: tcp
        mode: host
    networks:
      - frontend
    environment:
      - LOG_LEVEL=info
      - BACKEND_URL=http://api:5000
    healthcheck:
      test: ["CMD", "wget", "-qO-", "http://localhost/healthz"]
      interval: 10s
      timeout: 3s
      retries: 3
      start_period: 5s
    deploy:
      replicas: 2
      placement:
        constraints:
          - node.role == worker
          - node.labels.zone == edge
      update_config:
        parallelism: 1
        delay: 10s
        failure_action: rollback
        monitor: 15s
        order: start-first
      rollback_config:
        order: stop-first
      restart_policy:
        condition: on-failure
        delay: 5s
        max_attempts: 3
      resources:
        limits:
          cpus: "0.50"
          memory: 128M
      labels:
        traefik.enable: "true"
    stop_grace_period: 20s
  api:
    image: example/api:2.3
    command: python -m app --port 5000
    environment:
      WORKERS: "4"
      DATABASE_URL: postgres://app@db:5432/app
    networks:
      frontend:
        aliases:
          - backend-api
      backend: {}
    healthcheck:
      test: curl -fsS http://localhost:5000/health || exit 1
      interval: 30s
    deploy:
      mode: replicated
      replicas: 3
      endpoint_mode: vip
    labels:
      com.example.tier: api
  db:
    image: postgres:16
    environment:
      POSTGRES_PASSWORD_FILE: /run/secrets/db_password
    volumes:
      - dbdata:/var/lib/postgresql/data
    networks: [backend]
    deploy:
      mode: global
      endpoint_mode: dnsrr
      placement:
        constraints: [node.role == manager]
networks:
  frontend:
    driver: overlay
    attachable: true
  backend:
    driver: overlay
    ipam:
      config:
        - subnet: 10.20.0.0/24
volumes:
  dbdata:
"#;

#[test]
fn docker_s_recorded_stack_converts_as_docker_sent_it() {
    let s = one(DEMO).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let names: Vec<_> = s.services.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["demo_api", "demo_db", "demo_web"]);

    let web = svc(&s, "demo_web");
    assert_eq!(web.image, "nginx:1.25-alpine");
    assert_eq!(web.command, ["nginx", "-g", "daemon off;"]);
    assert!(web.entrypoint.is_empty());
    assert_eq!(web.env, ["BACKEND_URL=http://api:5000", "LOG_LEVEL=info"]);
    assert_eq!(web.mode, ServiceMode::Replicated { replicas: 2 });
    assert_eq!(web.ports.len(), 2);
    assert_eq!(
        (
            web.ports[0].published,
            web.ports[0].target,
            web.ports[0].mode
        ),
        (8080, 80, PublishMode::Ingress)
    );
    assert_eq!(
        (
            web.ports[1].published,
            web.ports[1].target,
            web.ports[1].mode
        ),
        (8443, 443, PublishMode::Host)
    );
    assert_eq!(web.networks, ["demo_frontend"]);
    assert_eq!(web.aliases["demo_frontend"], ["web"]);
    assert_eq!(
        web.constraints,
        ["node.role == worker", "node.labels.zone == edge"]
    );
    assert_eq!(
        (
            web.update.parallelism,
            web.update.delay_ms,
            web.update.monitor_ms
        ),
        (1, 10_000, 15_000)
    );
    assert_eq!(web.update.failure_action, FailureAction::Rollback);
    assert_eq!(web.update.order, UpdateOrder::StartFirst);
    assert_eq!(web.rollback.order, UpdateOrder::StopFirst);
    assert_eq!(
        (
            web.restart.condition,
            web.restart.delay_ms,
            web.restart.max_attempts
        ),
        (RestartCondition::OnFailure, 5000, 3)
    );
    assert_eq!(
        (web.resources.nano_cpus, web.resources.memory_bytes),
        (500_000_000, 134_217_728)
    );
    assert_eq!(web.stop_grace_period_ms, Some(20_000));
    let h = web.healthcheck.as_ref().unwrap();
    assert_eq!(h.test, ["CMD", "wget", "-qO-", "http://localhost/healthz"]);
    assert_eq!(
        (h.interval_ms, h.timeout_ms, h.start_period_ms, h.retries),
        (10_000, 3_000, 5_000, 3)
    );
    assert_eq!(
        web.labels,
        BTreeMap::from([
            (
                "com.docker.stack.image".to_string(),
                "nginx:1.25-alpine".to_string()
            ),
            ("com.docker.stack.namespace".into(), "demo".into()),
            ("traefik.enable".into(), "true".into()),
        ])
    );
    assert_eq!(
        web.container_labels,
        BTreeMap::from([("com.docker.stack.namespace".to_string(), "demo".to_string())])
    );

    let api = svc(&s, "demo_api");
    assert_eq!(api.command, ["python", "-m", "app", "--port", "5000"]);
    assert_eq!(
        api.env,
        ["DATABASE_URL=postgres://app@db:5432/app", "WORKERS=4"]
    );
    // Sorted by name, configured aliases first and then the short name, as Docker sends.
    assert_eq!(api.networks, ["demo_backend", "demo_frontend"]);
    assert_eq!(api.aliases["demo_frontend"], ["backend-api", "api"]);
    assert_eq!(api.aliases["demo_backend"], ["api"]);
    assert_eq!(
        api.healthcheck.as_ref().unwrap().test,
        [
            "CMD-SHELL",
            "curl -fsS http://localhost:5000/health || exit 1"
        ]
    );
    assert_eq!(api.container_labels["com.example.tier"], "api");
    // No deploy.restart_policy / update_config: Docker's (and mesh's) defaults.
    assert_eq!(api.restart, Default::default());
    assert_eq!(api.update, Default::default());

    let db = svc(&s, "demo_db");
    assert_eq!(db.mode, ServiceMode::Global);
    assert_eq!(db.endpoint_mode, EndpointMode::Dnsrr);
    assert_eq!(db.mounts.len(), 1);
    assert_eq!(
        (
            db.mounts[0].kind,
            db.mounts[0].source.as_str(),
            db.mounts[0].target.as_str()
        ),
        (MountType::Volume, "demo_dbdata", "/var/lib/postgresql/data")
    );

    let nets: Vec<_> = s
        .networks
        .iter()
        .map(|n| {
            (
                n.spec.name.as_str(),
                n.spec.attachable,
                n.spec.subnet.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        nets,
        [
            ("demo_backend", false, Some("10.20.0.0/24")),
            ("demo_frontend", true, None)
        ]
    );
    assert!(s
        .networks
        .iter()
        .all(|n| n.spec.labels["com.docker.stack.namespace"] == "demo" && !n.external));
    assert_eq!(s.volumes.len(), 1);
    assert_eq!(s.volumes[0].name, "demo_dbdata");
}

#[test]
fn what_mesh_cannot_honour_is_refused_by_name() {
    let base = "services:\n  web:\n    image: nginx\n    deploy:\n";
    for (extra, path) in [
        (
            "      placement:\n        preferences:\n          - spread: node.labels.zone\n",
            "compose.yml:7: services.web.deploy.placement.preferences: placement preferences are not supported by mesh (yet)",
        ),
        (
            "      resources:\n        reservations:\n          memory: 32M\n",
            "compose.yml:7: services.web.deploy.resources.reservations.memory: resource reservations are not supported by mesh (yet): only limits",
        ),
        (
            "      rollback_config:\n        parallelism: 2\n",
            "compose.yml:6: services.web.deploy.rollback_config.parallelism: not supported by mesh in rollback_config",
        ),
        (
            "      update_config:\n        max_failure_ratio: 0.2\n",
            "compose.yml:6: services.web.deploy.update_config.max_failure_ratio: not supported by mesh (yet)",
        ),
        (
            "      restart_policy:\n        window: 60s\n",
            "compose.yml:6: services.web.deploy.restart_policy.window: a restart window",
        ),
        (
            "      placement:\n        max_replicas_per_node: 2\n",
            "compose.yml:6: services.web.deploy.placement.max_replicas_per_node: not supported by mesh",
        ),
    ] {
        let e = err(&format!("{base}{extra}"));
        assert!(e.starts_with(path), "{extra}: {e}");
    }
    let e = err("services:\n  web:\n    image: nginx\n    cap_add: [NET_ADMIN]\n");
    assert_eq!(
        e,
        "compose.yml:4: services.web.cap_add: not supported by mesh"
    );
    let e = err("services:\n  web:\n    image: nginx\n    ports: [\"127.0.0.1:80:80\"]\n");
    assert!(
        e.starts_with("compose.yml:4: services.web.ports[0]: a host IP"),
        "{e}"
    );
    let e = err("services:\n  web:\n    image: nginx\nnetworks:\n  n:\n    driver: bridge\n");
    assert!(
        e.starts_with(
            "compose.yml:6: networks.n.driver: driver \"bridge\" is not supported by mesh"
        ),
        "{e}"
    );
    let s = one("services:\n  web:\n    image: nginx\n    networks: [n]\nnetworks:\n  n:\n    driver_opts:\n      encrypted: \"\"\n").unwrap();
    assert!(
        s.networks.iter().all(|n| n.spec.encrypted),
        "{:?}",
        s.networks
    );
    let e = err("services:\n  web:\n    image: nginx\nnetworks:\n  n:\n    driver_opts:\n      mtu: \"1400\"\n");
    assert!(
        e.starts_with("compose.yml:7: networks.n.driver_opts: invalid option \"mtu\""),
        "{e}"
    );
}

#[test]
fn unknown_keys_and_wrong_types_name_file_line_and_key() {
    let e = err(
        "version: '3.8'\nservices:\n  web:\n    image: nginx\n    deploy:\n      replicas: three\n",
    );
    assert_eq!(
        e,
        "compose.yml:6: services.web.deploy.replicas: invalid type: string \"three\", expected an integer"
    );
    let e = err("services:\n  web:\n    image: nginx\n    colour: blue\n");
    assert_eq!(
        e,
        "compose.yml:4: services.web.colour: unknown key (additional property not allowed)"
    );
    let e = err("services:\n  web:\n    image: nginx\n    deploy:\n      replica: 3\n");
    assert_eq!(
        e,
        "compose.yml:5: services.web.deploy.replica: unknown key (additional property not allowed)"
    );
    let e = err("servics:\n  web:\n    image: nginx\n");
    assert!(e.starts_with("compose.yml:1: servics: unknown key"), "{e}");
    let e = err("services:\n  web:\n    image: [nginx]\n");
    assert_eq!(
        e,
        "compose.yml:3: services.web.image: invalid type: a sequence, expected a string"
    );
    let e = err("services:\n  web:\n    image: nginx\n    init: maybe\n");
    assert_eq!(
        e,
        "compose.yml:4: services.web.init: invalid type: string \"maybe\", expected a boolean"
    );
    let e = err("services:\n  web:\n    image: nginx\n    stop_grace_period: 10\n");
    assert!(
        e.starts_with("compose.yml:4: services.web.stop_grace_period: invalid duration"),
        "{e}"
    );
    let e = err("services:\n  web:\n    image: nginx\n    deploy:\n      resources:\n        limits:\n          memory: lots\n");
    assert!(
        e.starts_with("compose.yml:7: services.web.deploy.resources.limits.memory: invalid size"),
        "{e}"
    );
    let e = err("services:\n  web:\n    image: nginx\n    networks: [back]\n");
    assert_eq!(
        e,
        "compose.yml:4: services.web.networks: service web refers to undefined network \"back\""
    );
    let e = err("services:\n  web:\n    image: nginx\n    volumes: [\"data:/d\"]\n");
    assert!(
        e.contains("named volume \"data\" is used but no declaration"),
        "{e}"
    );
    let e = err("services:\n  web:\n    image: nginx\n    secrets: [pw]\n");
    assert_eq!(
        e,
        "compose.yml:4: services.web.secrets[0]: service web refers to undefined secret pw"
    );
    let e = err("services:\n  web:\n    image: nginx\n  web:\n    image: httpd\n");
    assert!(e.contains("already defined at line 2"), "{e}");
    let e = err(
        "services:\n  web:\n    image: nginx\n    deploy:\n      mode: global\n      replicas: 2\n",
    );
    assert!(
        e.contains("replicas can only be used with replicated mode"),
        "{e}"
    );
    assert!(err("").contains("empty compose file"));
    assert!(one("services: {}\n").unwrap().services.is_empty());
}

#[test]
fn interpolation_from_the_environment_with_errors_at_their_line() {
    let text = "services:\n  web:\n    image: \"nginx:${TAG:-latest}\"\n    environment:\n      - DOMAIN=${DOMAIN?Variable DOMAIN not set}\n      - PRICE=$$5\n    deploy:\n      replicas: ${REPLICAS}\n";
    let src = |t: &str| {
        [Source {
            name: "compose.yml".into(),
            text: t.into(),
        }]
    };
    let s = load(
        &src(text),
        &opts("demo", &[("DOMAIN", "example.test"), ("REPLICAS", "3")]),
    )
    .unwrap();
    let web = svc(&s, "demo_web");
    assert_eq!(web.image, "nginx:latest");
    assert_eq!(web.env, ["DOMAIN=example.test", "PRICE=$5"]);
    assert_eq!(web.mode, ServiceMode::Replicated { replicas: 3 });
    let e = load(&src(text), &opts("demo", &[("REPLICAS", "3")]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "compose.yml:5: services.web.environment[0]: required variable DOMAIN is missing a value: Variable DOMAIN not set"
    );
    let e = load(
        &src("services:\n  web:\n    image: nginx:${\n"),
        &opts("d", &[]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("compose.yml:3: services.web.image: invalid interpolation format"),
        "{e}"
    );
    let e = load(
        &src(text),
        &opts("demo", &[("DOMAIN", "x"), ("REPLICAS", "many")]),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "compose.yml:8: services.web.deploy.replicas: invalid type: string \"many\", expected an integer"
    );
    // A variable named in a list without a value comes from the environment, or is left out.
    let s = load(
        &src("services:\n  web:\n    image: nginx\n    environment: [HOME, NOPE, A=1]\n"),
        &opts("demo", &[("HOME", "/root")]),
    )
    .unwrap();
    assert_eq!(svc(&s, "demo_web").env, ["A=1", "HOME=/root"]);
}

#[test]
fn later_files_override_earlier_ones() {
    let base = "version: '3.8'\nservices:\n  web:\n    image: nginx:1\n    environment: [A=1, B=2]\n    ports: [\"80:80\"]\n    deploy:\n      replicas: 1\n      labels: [x=1]\n  db:\n    image: postgres\n";
    let over = "services:\n  web:\n    image: nginx:2\n    environment:\n      B: \"3\"\n      C: \"4\"\n    ports: [\"443:443\", \"80:80\"]\n    deploy:\n      replicas: 4\n      labels:\n        y: \"2\"\n";
    let s = load(
        &[
            Source {
                name: "a.yml".into(),
                text: base.into(),
            },
            Source {
                name: "b.yml".into(),
                text: over.into(),
            },
        ],
        &opts("demo", &[]),
    )
    .unwrap();
    let web = svc(&s, "demo_web");
    assert_eq!(web.image, "nginx:2");
    assert_eq!(web.env, ["A=1", "B=3", "C=4"]);
    assert_eq!(web.mode, ServiceMode::Replicated { replicas: 4 });
    assert_eq!(web.ports.len(), 2);
    assert_eq!(
        (web.labels["x"].as_str(), web.labels["y"].as_str()),
        ("1", "2")
    );
    assert_eq!(svc(&s, "demo_db").image, "postgres");
    // Errors name the file the value came from.
    let e = load(
        &[
            Source {
                name: "a.yml".into(),
                text: base.into(),
            },
            Source {
                name: "b.yml".into(),
                text: "services:\n  web:\n    deploy:\n      replicas: x\n".into(),
            },
        ],
        &opts("demo", &[]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("b.yml:4: services.web.deploy.replicas"),
        "{e}"
    );
}

#[test]
fn ignored_keys_warn_as_docker_does_and_restart_still_counts() {
    let s = one("services:\n  web:\n    image: nginx\n    build: .\n    restart: on-failure:2\n    depends_on: [db]\n    container_name: w\n  db:\n    image: postgres\n")
        .unwrap();
    assert_eq!(
        s.warnings,
        ["Ignoring unsupported options: build, container_name, depends_on, restart"]
    );
    let web = svc(&s, "demo_web");
    assert_eq!(
        (web.restart.condition, web.restart.max_attempts),
        (RestartCondition::OnFailure, 2)
    );
}

#[test]
fn anchors_merge_keys_and_extension_fields() {
    let s = one(r#"
x-common: &common
  image: busybox:1.36
  environment:
    TZ: UTC
  deploy: &deploy
    restart_policy:
      condition: none
services:
  a:
    <<: *common
    x-note: ignored
    command: sleep 1000
  b:
    <<: *common
    image: busybox:latest
    deploy:
      <<: *deploy
      replicas: 2
"#)
    .unwrap();
    let a = svc(&s, "demo_a");
    assert_eq!(
        (a.image.as_str(), a.env.clone()),
        ("busybox:1.36", vec!["TZ=UTC".to_string()])
    );
    assert_eq!(a.command, ["sleep", "1000"]);
    assert_eq!(a.restart.condition, RestartCondition::None);
    let b = svc(&s, "demo_b");
    assert_eq!(b.image, "busybox:latest");
    assert_eq!(b.mode, ServiceMode::Replicated { replicas: 2 });
    assert_eq!(b.restart.condition, RestartCondition::None);
    // A service without networks is on the stack's default network.
    assert_eq!(s.networks.len(), 1);
    assert_eq!(s.networks[0].spec.name, "demo_default");
    assert_eq!(a.networks, ["demo_default"]);
    assert_eq!(a.aliases["demo_default"], ["a"]);
}

#[test]
fn a_command_without_an_image_is_a_host_process() {
    let s = one("services:\n  agent:\n    command: [\"sleep\", \"1000\"]\n    deploy:\n      mode: global\n").unwrap();
    let a = svc(&s, "demo_agent");
    assert!(a.image.is_empty());
    assert_eq!(a.command, ["sleep", "1000"]);
    assert!(!a.labels.contains_key("com.docker.stack.image"));
    let e = err("services:\n  agent:\n    command: sleep 1\n    user: nobody\n");
    assert!(
        e.starts_with("compose.yml:4: services.agent.user: needs an image"),
        "{e}"
    );
    let e = err("services:\n  agent:\n    hostname: x\n");
    assert!(e.contains("has neither an image nor a command"), "{e}");
}

/// The seed's httpd: one published replicated service.
#[test]
fn seed_httpd() {
    let s = load(
        &[Source {
            name: "docker-compose.yml".into(),
            text: "version: '3'\nservices:\n  web:\n    image: httpd:2.4\n    ports:\n      - \"80:80\"\n    deploy:\n      replicas: 3\n      restart_policy:\n        condition: on-failure\n".into(),
        }],
        &opts("myservice", &[]),
    )
    .unwrap();
    let web = svc(&s, "myservice_web");
    assert_eq!(web.mode, ServiceMode::Replicated { replicas: 3 });
    assert_eq!(web.ports[0].to_string(), "*:80->80/tcp");
    assert_eq!(s.networks[0].spec.name, "myservice_default");
}

/// Portainer's documented stack: a global agent on every Linux node, the server on a
/// manager, an attachable overlay, a named volume and bind mounts.
#[test]
fn seed_portainer() {
    let text = r#"version: '3.2'

services:
  agent:
    image: portainer/agent:2.19.4
    volumes:
      - /var/run/docker.sock:/var/run/docker.sock
      - /var/lib/docker/volumes:/var/lib/docker/volumes
    networks:
      - agent_network
    deploy:
      mode: global
      placement:
        constraints: [node.platform.os == linux]

  portainer:
    image: portainer/portainer-ce:2.19.4
    command: -H tcp://tasks.agent:9001 --tlsskipverify
    ports:
      - "9443:9443"
      - "9000:9000"
      - "8000:8000"
    volumes:
      - portainer_data:/data
    networks:
      - agent_network
    deploy:
      mode: replicated
      replicas: 1
      placement:
        constraints: [node.role == manager]

networks:
  agent_network:
    driver: overlay
    attachable: true

volumes:
  portainer_data:
"#;
    let s = load(
        &[Source {
            name: "portainer-agent-stack.yml".into(),
            text: text.into(),
        }],
        &opts("portainer", &[]),
    )
    .unwrap();
    let agent = svc(&s, "portainer_agent");
    assert_eq!(agent.mode, ServiceMode::Global);
    assert_eq!(agent.constraints, ["node.platform.os == linux"]);
    assert_eq!(agent.mounts[0].kind, MountType::Bind);
    assert_eq!(agent.mounts[0].source, "/var/run/docker.sock");
    let p = svc(&s, "portainer_portainer");
    assert_eq!(
        p.command,
        ["-H", "tcp://tasks.agent:9001", "--tlsskipverify"]
    );
    assert_eq!(p.ports.len(), 3);
    assert_eq!(p.mounts[0].source, "portainer_portainer_data");
    assert_eq!(s.networks[0].spec.name, "portainer_agent_network");
    assert!(s.networks[0].spec.attachable);
    assert_eq!(s.volumes[0].name, "portainer_portainer_data");
}

/// A traefik-style stack: an external network, `${VAR?}` interpolation, labels under
/// `deploy`, host-mode long ports, a read-only bind, secrets and configs.
#[test]
fn seed_traefik_with_secrets_and_configs() {
    let dir = std::env::temp_dir().join(format!("mesh-compose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("traefik.toml"), "[entryPoints]\n").unwrap();
    std::fs::write(dir.join("pw.txt"), "s3cret\n").unwrap();
    std::fs::write(dir.join("app.env"), "# comment\nMODE=prod\nHOME\n").unwrap();
    let text = r#"version: '3.7'
services:
  traefik:
    image: traefik:v2.10
    command:
      - --providers.docker.swarmMode=true
      - --entrypoints.web.address=:80
    ports:
      - target: 80
        published: 80
        mode: host
      - "8080:8080/tcp"
    volumes:
      - /var/run/docker.sock:/var/run/docker.sock:ro
      - ./certs:/certs
      - type: tmpfs
        target: /tmp
    networks: [traefik-public]
    configs:
      - source: traefik_toml
        target: /etc/traefik/traefik.toml
    secrets:
      - pw
      - source: api_key
        target: api.txt
        uid: "1000"
        mode: 0400
    env_file: app.env
    deploy:
      labels:
        - traefik.http.routers.api.rule=Host(`traefik.${DOMAIN?Variable not set}`)
      placement:
        constraints:
          - node.role == manager
networks:
  traefik-public:
    external: true
configs:
  traefik_toml:
    file: ./traefik.toml
secrets:
  pw:
    file: ./pw.txt
  api_key:
    external: true
    name: shared_api_key
"#;
    let o = Options {
        namespace: "proxy".into(),
        base_dir: dir.clone(),
        env: env(&[("DOMAIN", "example.test"), ("HOME", "/root")]),
    };
    let s = load(
        &[Source {
            name: "traefik.yml".into(),
            text: text.into(),
        }],
        &o,
    )
    .unwrap();
    let t = svc(&s, "proxy_traefik");
    assert_eq!(t.command.len(), 2);
    assert_eq!(
        t.labels["traefik.http.routers.api.rule"],
        "Host(`traefik.example.test`)"
    );
    assert_eq!(t.ports[0].mode, PublishMode::Host);
    assert_eq!(
        (t.ports[1].published, t.ports[1].protocol),
        (8080, Protocol::Tcp)
    );
    assert!(t.mounts[0].readonly);
    assert_eq!(t.mounts[1].source, dir.join("certs").display().to_string());
    assert_eq!(t.mounts[2].kind, MountType::Tmpfs);
    assert_eq!(t.networks, ["traefik-public"]);
    assert_eq!(t.env, ["HOME=/root", "MODE=prod"]);
    assert_eq!(s.networks.len(), 1);
    assert!(s.networks[0].external);
    // Secrets: the short form's file is named after the key; modes are octal as in YAML 1.1.
    assert_eq!(t.secrets.len(), 2);
    assert_eq!(
        (
            t.secrets[0].source.as_str(),
            t.secrets[0].target.as_str(),
            t.secrets[0].mode
        ),
        ("proxy_pw", "pw", 0o444)
    );
    assert_eq!(
        (
            t.secrets[1].source.as_str(),
            t.secrets[1].target.as_str(),
            t.secrets[1].uid.as_str(),
            t.secrets[1].mode
        ),
        ("shared_api_key", "api.txt", "1000", 0o400)
    );
    assert_eq!(t.configs[0].source, "proxy_traefik_toml");
    assert_eq!(t.configs[0].target, "/etc/traefik/traefik.toml");
    let pw = s
        .secrets
        .iter()
        .find(|b| b.spec.name == "proxy_pw")
        .unwrap();
    assert_eq!((pw.kind, pw.external), (BlobKind::Secret, false));
    assert_eq!(pw.spec.data, b"s3cret\n");
    assert_eq!(pw.spec.labels["com.docker.stack.namespace"], "proxy");
    let key = s
        .secrets
        .iter()
        .find(|b| b.spec.name == "shared_api_key")
        .unwrap();
    assert!(key.external && key.spec.data.is_empty() && key.spec.labels.is_empty());
    assert_eq!(s.configs[0].spec.data, b"[entryPoints]\n");
    // A missing secret file is named.
    std::fs::remove_file(dir.join("pw.txt")).unwrap();
    let e = load(
        &[Source {
            name: "traefik.yml".into(),
            text: text.into(),
        }],
        &o,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("traefik.yml:43: secrets.pw.file: cannot read"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn files_and_dotenv_from_disk() {
    let dir = std::env::temp_dir().join(format!("mesh-compose-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".env"), "WEB_TAG=1.2\n").unwrap();
    std::fs::write(
        dir.join("a.yml"),
        "services:\n  web:\n    image: nginx:${WEB_TAG}\n",
    )
    .unwrap();
    std::fs::write(dir.join("b.yml"), "services:\n  web:\n    hostname: w\n").unwrap();
    let s = crate::load_files(&[dir.join("a.yml"), dir.join("b.yml")], "st").unwrap();
    let web = svc(&s, "st_web");
    assert_eq!(
        (web.image.as_str(), web.hostname.as_str()),
        ("nginx:1.2", "w")
    );
    let e = crate::load_files(&[dir.join("nope.yml")], "st").unwrap_err();
    assert!(e.to_string().starts_with("cannot read"), "{e}");
    let e = crate::load_files(&[dir.join("a.yml")], "bad name").unwrap_err();
    assert!(e.to_string().contains("invalid stack name"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
