//! Differential tests: the same catalog request to the demo catalog (an
//! independent plain-scan implementation of Backstage's semantics) and to a
//! sidecar mirroring it must give the same status and the same JSON body.
//! Both run in-process over loopback; the sidecar serves every query from its
//! mirror, so any difference is a bug on one side (or a documented choice).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use catalog_cache::config::{Config, Dur};
use catalog_cache::sidecar::{Clock, Sidecar};
use catalog_fake::{FakeCatalog, FakeCatalogHandle, FakeOptions};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const ENTITIES: usize = 1500;
const SEED: u64 = 20_261_201;

/// One demo catalog and one sidecar in front of it.
struct Pair {
    fake: FakeCatalogHandle,
    proxy: String,
    admin: String,
    admin_token: String,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// One answer, reduced to what is compared.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: u16,
    body: Value,
    link: Option<String>,
}

/// A request sent to both sides.
#[derive(Debug, Clone)]
struct Req {
    post: bool,
    /// Path and query below `/api/catalog`.
    path: String,
    body: Option<Value>,
    /// Whether `error.message` must match too (false where Backstage's own
    /// wording is not known, see `any_wording`).
    wording: bool,
}

impl Req {
    /// Compares an error by status and `error.name` only.
    fn any_wording(mut self) -> Req {
        self.wording = false;
        self
    }
}

fn get(path: impl Into<String>) -> Req {
    Req {
        post: false,
        path: path.into(),
        body: None,
        wording: true,
    }
}

fn post(path: impl Into<String>, body: Value) -> Req {
    Req {
        post: true,
        path: path.into(),
        body: Some(body),
        wording: true,
    }
}

impl Pair {
    async fn start() -> Pair {
        let fake = FakeCatalog::start(FakeOptions {
            entities: ENTITIES,
            seed: SEED,
            ..FakeOptions::default()
        })
        .await
        .expect("the demo catalog starts");
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.upstream.url = fake.base_url();
        config.mirror.path = dir.path().join("catalog-cache.db");
        config.mirror.sync_interval = Dur(Duration::from_secs(3600));
        config.mirror.sync_jitter = 0.0;
        config.admin.token_file = dir.path().join("admin.token");
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap().to_string();
        let admin_addr = admin.local_addr().unwrap().to_string();
        let sidecar: Arc<Sidecar> =
            tokio::task::spawn_blocking(move || Sidecar::open(config, Clock::system()))
                .await
                .unwrap()
                .expect("the sidecar opens");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(sidecar.run(proxy, admin, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let ready = format!("http://{admin_addr}/readyz");
        let mut waited = 0;
        loop {
            if let Ok(r) = client.get(&ready).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            waited += 1;
            assert!(waited < 1000, "the sidecar never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let admin_token = std::fs::read_to_string(dir.path().join("admin.token"))
            .expect("the sidecar writes its admin token")
            .trim()
            .to_string();
        Pair {
            fake,
            proxy: format!("http://{proxy_addr}/api/catalog"),
            admin: format!("http://{admin_addr}"),
            admin_token,
            client,
            _stop: stop,
            _dir: dir,
        }
    }

    async fn send(&self, base: &str, req: &Req) -> Reply {
        let url = format!("{base}{}", req.path);
        let builder = if req.post {
            let b = self.client.post(&url);
            match &req.body {
                Some(body) => b
                    .header("content-type", "application/json")
                    .body(body.to_string()),
                None => b,
            }
        } else {
            self.client.get(&url)
        };
        let r = builder
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = r.status().as_u16();
        let link = r
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body, link }
    }

    async fn upstream(&self, req: &Req) -> Reply {
        self.send(&self.fake.base_url(), req).await
    }

    async fn sidecar(&self, req: &Req) -> Reply {
        self.send(&self.proxy, req).await
    }

    async fn sync(&self) -> Value {
        let r = self
            .client
            .post(format!("{}/admin/sync", self.admin))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

/// The `after` value of a `Link` header, decoded, with the rest of the link.
fn split_link(link: &str) -> (String, Option<Value>) {
    let mut rest = Vec::new();
    let mut after = None;
    let inner = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or_default();
    let (path, qs) = inner.split_once('?').unwrap_or((inner, ""));
    for pair in qs.split('&') {
        match pair.strip_prefix("after=") {
            Some(v) => {
                let v = urldecode(v);
                after = base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            }
            None => rest.push(pair.to_string()),
        }
    }
    rest.sort();
    (format!("{path}?{}", rest.join("&")), after)
}

fn urldecode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why two replies differ, or `None` when they agree. Cursors are opaque, so
/// `nextCursor`/`prevCursor` are compared by presence only; error bodies by
/// status, `error.name`, `error.message` and `response.statusCode`.
fn difference(upstream: &Reply, sidecar: &Reply, wording: bool) -> Option<String> {
    if upstream.status != sidecar.status {
        return Some(format!(
            "status {} vs {}\n  upstream: {}\n  sidecar:  {}",
            upstream.status,
            sidecar.status,
            short(&upstream.body),
            short(&sidecar.body)
        ));
    }
    if upstream.status >= 400 {
        for pointer in ["/error/name", "/error/message", "/response/statusCode"] {
            let (a, b) = (
                upstream.body.pointer(pointer),
                sidecar.body.pointer(pointer),
            );
            if pointer == "/error/message" && (!wording || both_start_with(a, b, MALFORMED_CURSOR))
            {
                continue;
            }
            if a != b {
                return Some(format!("{pointer}: {a:?} vs {b:?}"));
            }
        }
        return None;
    }
    let (a, b) = (strip_cursors(&upstream.body), strip_cursors(&sidecar.body));
    if a != b {
        return Some(format!(
            "bodies differ: {}\n  upstream: {}\n  sidecar:  {}",
            first_difference(&a, &b, String::new()),
            short(&upstream.body),
            short(&sidecar.body)
        ));
    }
    match (&upstream.link, &sidecar.link) {
        (None, None) => None,
        (Some(a), Some(b)) if a == b || split_link(a) == split_link(b) => None,
        (a, b) => Some(format!("Link {a:?} vs {b:?}")),
    }
}

/// Backstage words a bad cursor `Malformed cursor: ${e}` with a Node.js
/// error after the colon that neither side can reproduce, so only the prefix
/// is compared.
const MALFORMED_CURSOR: &str = "Malformed cursor: ";

fn both_start_with(a: Option<&Value>, b: Option<&Value>, prefix: &str) -> bool {
    let starts = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .is_some_and(|s| s.starts_with(prefix))
    };
    starts(a) && starts(b)
}

fn strip_cursors(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(info) = v.get_mut("pageInfo").and_then(Value::as_object_mut) {
        for key in ["nextCursor", "prevCursor"] {
            if let Some(c) = info.get_mut(key) {
                *c = json!("<cursor>");
            }
        }
    }
    v
}

fn first_difference(a: &Value, b: &Value, at: String) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                match y.get(k) {
                    None => return format!("{at}/{k} only upstream"),
                    Some(vb) if va != vb => return first_difference(va, vb, format!("{at}/{k}")),
                    _ => {}
                }
            }
            for k in y.keys() {
                if !x.contains_key(k) {
                    return format!("{at}/{k} only sidecar");
                }
            }
            format!("{at}: key order")
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                if va != vb {
                    return first_difference(va, vb, format!("{at}/{i}"));
                }
            }
            format!("{at}: lengths {} vs {}", x.len(), y.len())
        }
        _ => format!("{at}: {} vs {}", short(a), short(b)),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(300).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(v.to_string())
}

fn entity_ref(e: &Value) -> String {
    format!(
        "{}:{}/{}",
        e["kind"].as_str().unwrap().to_lowercase(),
        e["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_lowercase(),
        e["metadata"]["name"].as_str().unwrap().to_lowercase()
    )
}

/// Values of the generated catalog that the requests refer to.
struct Sample {
    component: Value,
    mixed_case: Value,
    group_ref: String,
    depends_on: String,
    user: Value,
}

fn sample(entities: &[Value]) -> Sample {
    fn of_kind<'a>(entities: &'a [Value], k: &'static str) -> impl Iterator<Item = &'a Value> {
        entities.iter().filter(move |e| e["kind"] == k)
    }
    let component = of_kind(entities, "Component")
        .find(|e| e["metadata"]["namespace"] == "default")
        .expect("a component")
        .clone();
    let mixed_case = entities
        .iter()
        .find(|e| {
            let n = e["metadata"]["name"].as_str().unwrap();
            n != n.to_lowercase()
        })
        .expect("a mixed-case name")
        .clone();
    let depends_on = of_kind(entities, "Component")
        .find_map(|e| {
            e["spec"]["dependsOn"]
                .as_array()?
                .first()?
                .as_str()
                .map(String::from)
        })
        .expect("a dependsOn");
    // The most common owner, so the relation filter matches many entities.
    let mut owners = std::collections::BTreeMap::<String, usize>::new();
    for e in entities {
        for r in e["relations"].as_array().into_iter().flatten() {
            if r["type"] == "ownedBy" {
                *owners
                    .entry(r["targetRef"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
    let group_ref = owners
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(r, _)| r)
        .expect("an owner");
    let user = of_kind(entities, "User").next().expect("a user").clone();
    Sample {
        component,
        mixed_case,
        group_ref,
        depends_on,
        user,
    }
}

fn requests(s: &Sample) -> Vec<Req> {
    let c = &s.component;
    let c_ref = entity_ref(c);
    let c_name = c["metadata"]["name"].as_str().unwrap().to_string();
    let c_uid = c["metadata"]["uid"].as_str().unwrap().to_string();
    let m = &s.mixed_case;
    let m_kind = m["kind"].as_str().unwrap().to_string();
    let m_ns = m["metadata"]["namespace"].as_str().unwrap().to_string();
    let m_name = m["metadata"]["name"].as_str().unwrap().to_string();
    let owner = enc(&s.group_ref);
    let dep = enc(&s.depends_on);
    let user_ref = entity_ref(&s.user);
    let upper_group = s.group_ref.to_uppercase();
    vec![
        // GET /entities
        get("/entities?limit=20"),
        get("/entities?filter=kind=component&limit=15"),
        get("/entities?filter=kind=api&filter=kind=group&limit=30&offset=10"),
        get("/entities?filter=kind=component,spec.lifecycle=production&fields=metadata.name,kind"),
        get("/entities?filter=KIND=Component,Spec.Type=SERVICE&limit=10"),
        get("/entities?filter=kind=component,kind=api&fields=metadata.name&limit=40"),
        get("/entities?filter=metadata.tags=java&fields=metadata.name,metadata.tags"),
        get("/entities?filter=metadata.tags.java&fields=metadata.name"),
        get("/entities?filter=metadata.tags=JAVA&filter=metadata.tags=rust&fields=metadata.uid"),
        get(format!("/entities?filter=spec.dependsOn={dep}&fields=metadata.name")),
        get(format!("/entities?filter=relations.ownedBy={owner}&fields=metadata.name,metadata.uid")),
        get(format!("/entities?filter=relations.ownedby={}&fields=metadata.name", enc(&upper_group))),
        get("/entities?filter=spec.lifecycle&fields=metadata.name&limit=50"),
        get("/entities?filter=kind=user&fields=metadata.name,spec.profile.email&limit=10"),
        get("/entities?filter=metadata.namespace=DEFAULT,kind=Group&fields=metadata.name,spec"),
        get("/entities?order=asc:metadata.name&limit=25&fields=metadata.name"),
        get("/entities?order=desc:metadata.name&limit=25&offset=5&fields=metadata.name"),
        get("/entities?order=asc:spec.lifecycle&fields=metadata.name,spec.lifecycle"),
        get("/entities?order=desc:spec.lifecycle&order=asc:metadata.name&limit=400&fields=metadata.name,spec.lifecycle"),
        get("/entities?limit=0"),
        get(format!("/entities?after={}", enc(&b64(&json!({"limit": 7, "offset": 3}))))),
        get(format!("/entities?limit=50&after={}", enc(&b64(&json!({"limit": 4, "offset": 12}))))),
        get("/entities?filter==foo"),
        get("/entities?limit=abc"),
        get("/entities?order=sideways:metadata.name"),
        get("/entities?after=notbase64!!!"),
        get("/entities?fields=metadata.tags[0]"),
        get("/entities?filter=kind=resource&fields=metadata.annotations.backstage.io/techdocs-ref,metadata.labels.tier,spec.nope"),
        // GET /entities/by-query
        get("/entities/by-query"),
        get("/entities/by-query?limit=5&filter=kind=component&orderField=metadata.name,asc"),
        get("/entities/by-query?limit=7&orderField=metadata.name,desc&fields=metadata.name"),
        get("/entities/by-query?limit=50&orderField=spec.lifecycle,asc&fields=metadata.name,spec.lifecycle&filter=kind=api&filter=kind=group"),
        get("/entities/by-query?limit=50&orderField=spec.lifecycle,desc&orderField=metadata.name&fields=metadata.name,spec.lifecycle"),
        get("/entities/by-query?fullTextFilterTerm=checkout&limit=10&fields=metadata.name"),
        get("/entities/by-query?fullTextFilterTerm=Payments&fullTextFilterFields=metadata.name,metadata.title&limit=10&fields=metadata.name,metadata.title"),
        get("/entities/by-query?fullTextFilterTerm=PROD&fullTextFilterFields=spec.lifecycle&orderField=metadata.name,asc&limit=20&fields=metadata.name"),
        get("/entities/by-query?limit=0"),
        get("/entities/by-query?limit=0&filter=kind=api"),
        get("/entities/by-query?fields=metadata.name,kind&limit=3"),
        get("/entities/by-query?offset=5&limit=5&fields=metadata.uid"),
        get("/entities/by-query?filter=metadata.tags=JAVA&filter=metadata.tags=rust&fields=metadata.name&limit=100"),
        get(format!("/entities/by-query?filter=relations.ownedBy={owner},kind=component&fields=metadata.name")),
        get("/entities/by-query?cursor=garbage"),
        get(format!("/entities/by-query?cursor={}", enc(&b64(&json!({"hello": 1}))))),
        get("/entities/by-query?limit=abc"),
        get("/entities/by-query?orderField=metadata.name,up"),
        get("/entities/by-query?filter==foo"),
        // POST /entities/by-query
        post("/entities/by-query", json!({"query": {"kind": "component"}, "limit": 5})),
        post("/entities/by-query", json!({"query": {"$all": [{"kind": "component"}, {"spec.lifecycle": "production"}]}, "limit": 10, "fields": ["metadata.name", "spec.lifecycle"]})),
        post("/entities/by-query", json!({"query": {"$any": [{"kind": "api"}, {"kind": "group"}]}, "limit": 10, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"$not": {"kind": "component"}}, "limit": 10, "fields": ["kind"]})),
        post("/entities/by-query", json!({"query": {"spec.lifecycle": {"$exists": false}}, "limit": 20, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"spec.lifecycle": {"$exists": true}}, "limit": 20, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"kind": {"$in": ["API", "group"]}}, "limit": 20, "fields": ["metadata.name", "kind"]})),
        post("/entities/by-query", json!({"query": {"metadata.name": {"$hasPrefix": "Check"}}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"metadata.tags": {"$contains": "java"}}, "limit": 30, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"relations.ownedBy": s.group_ref}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"spec.dependsOn": s.depends_on}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"$all": []}, "limit": 5, "fields": ["metadata.uid"]})),
        post("/entities/by-query", json!({"query": {"$any": []}, "limit": 5})),
        post("/entities/by-query", json!({"query": {"kind": "component"}, "orderBy": [{"field": "metadata.name", "order": "desc"}], "limit": 10, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"kind": "user"}, "fullTextFilter": {"term": "ada", "fields": ["metadata.name"]}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"kind": "api"}, "limit": 0})),
        post("/entities/by-query", json!({"limit": 4, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"kind": {"$regex": "x"}}})),
        post("/entities/by-query", json!({"query": {"kind": "component"}, "orderBy": [{"field": "metadata.name", "order": "sideways"}]})),
        post("/entities/by-query", json!({"cursor": "garbage"})),
        post("/entities/by-query", json!({"query": {"$not": {"kind": "user"}, "kind": "group"}})),
        // The sidecar says "Query must be an object", the demo catalog the
        // wording of `applyPredicateEntityFilterToQuery`; the router's zod
        // schema may answer first, so neither is known to be Backstage's.
        post("/entities/by-query", json!({"query": "component"})).any_wording(),
        // facets
        get("/entity-facets?facet=kind"),
        get("/entity-facets?facet=spec.lifecycle&facet=metadata.tags&filter=kind=component"),
        get("/entity-facets?facet=relations.ownedBy&filter=kind=api"),
        get("/entity-facets?facet=metadata.name&filter=kind=group"),
        get("/entity-facets?facet=kind&filter==foo"),
        post("/entity-facets", json!({"facets": ["kind", "spec.type"], "query": {"$not": {"kind": "user"}}})),
        post("/entity-facets", json!({"facets": ["kind"], "query": {"$any": []}})),
        post("/entity-facets", json!({"facets": ["spec.lifecycle"]})),
        // by-refs
        post("/entities/by-refs", json!({"entityRefs": [c_ref, "Group:default/TEAM-0001", "component:default/does-not-exist", user_ref]})),
        post("/entities/by-refs?filter=kind=component", json!({"entityRefs": [c_ref, user_ref]})),
        post("/entities/by-refs?fields=metadata.name,kind", json!({"entityRefs": [user_ref, c_ref]})),
        post("/entities/by-refs", json!({"entityRefs": [c_ref, user_ref], "fields": ["metadata.uid"]})),
        post("/entities/by-refs", json!({"entityRefs": [c_ref, user_ref], "query": {"kind": "user"}})),
        post("/entities/by-refs", json!({"entityRefs": "nope"})),
        post("/entities/by-refs", json!({"entityRefs": ["component:default/x", 7]})),
        post("/entities/by-refs", json!({"fields": ["kind"]})),
        // corners
        get("/entities?order=asc:Metadata.Name&limit=10&fields=metadata.name"),
        get("/entities/by-query?orderField=METADATA.NAME,desc&limit=10&fields=metadata.name"),
        get("/entities/by-query?fullTextFilterTerm=%20checkout%20&limit=10&fields=metadata.name"),
        get("/entities/by-query?fullTextFilterTerm=CHECKOUT&fullTextFilterFields=Metadata.Name&limit=10&fields=metadata.name"),
        get(format!("/entities?filter=metadata.annotations.backstage.io/managed-by-location={}&fields=metadata.name", enc(&format!("url:https://github.com/acme/{}/blob/main/catalog-info.yaml", c_name.to_lowercase())))),
        get(format!("/entities?filter=metadata.name={}&fields=metadata.name", m_name.to_uppercase())),
        get("/entities?filter=kind=component&filter=&limit=5&fields=metadata.name"),
        get("/entities?fields=%20metadata.name%20,%20kind%20&limit=5"),
        get("/entities?limit=-1"),
        get("/entities?offset=-1&limit=5"),
        get("/entities/by-query?limit=-1"),
        get("/entities/by-query?offset=1400&limit=200&fields=metadata.uid"),
        get("/entities/by-query?filter=spec.type=service&filter=spec.type=website&limit=0"),
        get("/entity-facets?facet=metadata.tags&facet=Kind"),
        get("/entity-facets?facet=spec.owner&filter=kind=system"),
        get("/entity-facets?facet=metadata.annotations.backstage.io/techdocs-ref"),
        get("/entity-facets"),
        get("/entity-facets?facet="),
        post("/entities/by-query", json!({"query": {"metadata.labels.tier": {"$in": [1, 2]}}, "fields": ["metadata.name"], "limit": 20})),
        post("/entities/by-query", json!({"query": {"relations": {"$contains": {"type": "ownedBy", "targetRef": s.group_ref}}}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"relations.ownedBy": {"$hasPrefix": "GROUP:default/team-00"}}, "fields": ["metadata.name"], "limit": 30})),
        post("/entities/by-query", json!({"query": {"$all": [{"$not": {"kind": "component"}}, {"$any": [{"spec.lifecycle": "deprecated"}, {"spec.type": "grpc"}]}]}, "fields": ["metadata.name", "kind"]})),
        post("/entities/by-query", json!({"query": {"metadata.tags": "JAVA", "kind": "Component"}, "fields": ["metadata.name"], "limit": 15, "offset": 5})),
        // No stored OpenAPI schema for the POST body says how a negative
        // limit is worded.
        post("/entities/by-query", json!({"query": {"kind": "component"}, "limit": -3})).any_wording(),
        get("/entities?order=asc:metadata.tags&fields=metadata.name,metadata.tags&filter=kind=component&limit=60"),
        get("/entities/by-query?orderField=metadata.tags,desc&fields=metadata.name,metadata.tags&filter=kind=api&limit=60"),
        post("/entities/by-query", json!({"query": {"kind": "component"}, "limit": "ten"})),
        post("/entity-facets", json!({"facets": ["metadata.tags"], "query": {"$all": []}})),
        post("/entity-facets", json!({"query": {"kind": "api"}})),
        post("/entities/by-refs", json!({"entityRefs": [c_ref, c_ref, "not a ref"]})),
        post("/entities/by-refs", json!({"entityRefs": []})),
        get("/entities?filter=%20kind%20=%20component%20&limit=5&fields=metadata.name"),
        get("/entities?filter=kind=component,&limit=5&fields=metadata.name"),
        get("/entities?filter=kind=&limit=5&fields=metadata.name"),
        get("/entities?filter=metadata.name=a=b&limit=5&fields=metadata.name"),
        get("/entities?after=&limit=5"),
        get(format!("/entities?offset=3&after={}", enc(&b64(&json!({"limit": 6, "offset": 9}))))),
        get(format!("/entities?after={}", enc(&b64(&json!({"limit": "x"}))))),
        get("/entities/by-query?cursor=&limit=5&fields=metadata.name"),
        get("/entities/by-query?fullTextFilterTerm=%25&limit=5&fields=metadata.name"),
        get("/entities/by-query?fullTextFilterTerm=_&limit=5&fields=metadata.name"),
        get("/entities/by-query?fullTextFilterTerm=team&orderField=metadata.name,asc&limit=5&fields=metadata.name"),
        get("/entities/by-query?fullTextFilterTerm=%20%20&limit=5&fields=metadata.name"),
        post("/entities/by-query", json!({"query": {"metadata.name": {"$hasPrefix": "%"}}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"kind": {"$in": []}}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"relations.ownedBy": {"$exists": false}}, "fields": ["metadata.name"], "limit": 20})),
        post("/entities/by-query", json!({"query": {"spec.dependsOn": {"$contains": s.depends_on}}, "fields": ["metadata.name"]})),
        post("/entities/by-query", json!({"query": {"kind": "group"}, "fields": ["metadata.name"], "limit": 5, "offset": 3, "orderBy": [{"field": "metadata.name"}]})),
        post("/entities/by-query", json!({"query": {"$not": {"$not": {"kind": "domain"}}}, "fields": ["metadata.name"]})),
        get("/entity-facets?facet=spec.dependsOn&facet=relations.ownedBy&filter=kind=component"),
        post("/entity-facets", json!({"facets": ["spec.lifecycle"], "query": {"kind": "component"}})),
        post("/entities/by-refs?filter=kind=user", json!({"entityRefs": [c_ref, user_ref], "query": {"kind": "component"}})),
        get(format!("/entities/by-name/{}/{}/{}", m_kind, m_ns, m_name)),
        get(format!("/entities/by-uid/{}", c_uid.to_uppercase())),
        // by-name, by-uid
        get(format!("/entities/by-name/component/default/{c_name}")),
        get(format!("/entities/by-name/{}/{}/{}", m_kind.to_uppercase(), m_ns.to_uppercase(), m_name.to_lowercase())),
        get("/entities/by-name/component/default/does-not-exist"),
        get(format!("/entities/by-uid/{c_uid}")),
        get("/entities/by-uid/00000000-0000-0000-0000-000000000000"),
    ]
}

/// Every endpoint and parameter, both sides: same status, same body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_answers_alike() {
    let pair = Pair::start().await;
    let s = sample(&pair.fake.entities());
    let reqs = requests(&s);
    assert!(reqs.len() >= 60, "{} requests", reqs.len());
    let mut failures = Vec::new();
    let mut statuses = HashSet::new();
    for req in &reqs {
        let (a, b) = (pair.upstream(req).await, pair.sidecar(req).await);
        statuses.insert(a.status);
        if let Some(why) = difference(&a, &b, req.wording) {
            failures.push(format!(
                "{} {} {}\n  {why}",
                if req.post { "POST" } else { "GET" },
                req.path,
                req.body.as_ref().map(short).unwrap_or_default()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests differ:\n{}",
        failures.len(),
        reqs.len(),
        failures.join("\n")
    );
    // The table exercises successes, bad input and misses alike.
    for status in [200, 400, 404] {
        assert!(statuses.contains(&status), "no request answered {status}");
    }
}

/// Which side of the pair a walk runs against.
#[derive(Clone, Copy, Debug)]
enum Side {
    Upstream,
    Sidecar,
}

impl Pair {
    async fn on(&self, side: Side, req: &Req) -> Reply {
        match side {
            Side::Upstream => self.upstream(req).await,
            Side::Sidecar => self.sidecar(req).await,
        }
    }
}

/// How a by-query walk continues from a cursor.
#[derive(Clone, Copy)]
enum Walk {
    /// `GET ?cursor=…` with these extra parameters (`limit`, `fields`).
    Get(&'static str),
    /// `POST {"cursor": …, "limit": n, "fields": [...]}`.
    Post(usize, &'static [&'static str]),
}

impl Walk {
    fn next(self, cursor: &str) -> Req {
        match self {
            Walk::Get(extra) => get(format!("/entities/by-query?cursor={}&{extra}", enc(cursor))),
            Walk::Post(limit, fields) => post(
                "/entities/by-query",
                json!({"cursor": cursor, "limit": limit, "fields": fields}),
            ),
        }
    }
}

/// One page of a by-query walk: its items and cursors.
struct Page {
    reply: Reply,
    next: Option<String>,
    prev: Option<String>,
}

impl Page {
    fn of(reply: Reply) -> Page {
        assert_eq!(reply.status, 200, "{}", short(&reply.body));
        let cursor = |k: &str| reply.body["pageInfo"][k].as_str().map(String::from);
        Page {
            next: cursor("nextCursor"),
            prev: cursor("prevCursor"),
            reply,
        }
    }

    fn items(&self) -> &[Value] {
        self.reply.body["items"]
            .as_array()
            .map_or(&[], Vec::as_slice)
    }
}

/// Follows `nextCursor` from `first` to the last page (at most 200 pages).
async fn walk(pair: &Pair, side: Side, first: &Req, how: Walk) -> Vec<Page> {
    let mut pages = vec![Page::of(pair.on(side, first).await)];
    while let Some(cursor) = pages.last().and_then(|p| p.next.clone()) {
        assert!(pages.len() < 200, "{side:?}: a walk that never ends");
        pages.push(Page::of(pair.on(side, &how.next(&cursor)).await));
    }
    pages
}

fn uids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|e| {
            e["metadata"]["uid"]
                .as_str()
                .expect("items carry metadata.uid")
                .to_string()
        })
        .collect()
}

/// The JSON state inside a cursor (base64 of JSON, as the official client
/// assumes when it looks for `query`).
fn decode_cursor(cursor: &str) -> Value {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(cursor)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(cursor))
        .unwrap_or_else(|e| panic!("cursor {cursor:?} is not base64: {e}"));
    let v: Value = serde_json::from_slice(&bytes).expect("a cursor is base64 of JSON");
    assert!(v.is_object(), "a cursor holds a JSON object: {v}");
    v
}

/// Walks to the end on both sides (GET and POST cursors, `Link` paging) and
/// gets the same pages, page by page; then walks back with `prevCursor`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walks_to_the_end_alike() {
    let pair = Pair::start().await;
    let walks: Vec<(Req, Walk, bool)> = vec![
        (
            get("/entities/by-query?limit=97&fields=metadata.uid,metadata.name"),
            Walk::Get("limit=97&fields=metadata.uid,metadata.name"),
            false,
        ),
        (
            get("/entities/by-query?limit=83&orderField=metadata.name,asc&fields=metadata.uid,metadata.name"),
            Walk::Get("limit=83&fields=metadata.uid,metadata.name"),
            false,
        ),
        (
            get("/entities/by-query?limit=64&orderField=spec.lifecycle,desc&filter=kind=component&filter=kind=group&fields=metadata.uid,spec.lifecycle"),
            Walk::Get("limit=64&fields=metadata.uid,spec.lifecycle"),
            false,
        ),
        (
            get("/entities/by-query?limit=25&fullTextFilterTerm=service&fullTextFilterFields=metadata.name&orderField=metadata.name,desc&fields=metadata.uid"),
            Walk::Get("limit=25&fields=metadata.uid"),
            false,
        ),
        (
            post(
                "/entities/by-query",
                json!({"query": {"$any": [{"kind": "component"}, {"metadata.tags": {"$contains": "java"}}]},
                       "orderBy": [{"field": "metadata.name", "order": "asc"}], "limit": 71,
                       "fields": ["metadata.uid", "metadata.name"]}),
            ),
            Walk::Post(71, &["metadata.uid", "metadata.name"]),
            true,
        ),
        (
            post(
                "/entities/by-query",
                json!({"query": {"$not": {"kind": "user"}}, "limit": 150, "fields": ["metadata.uid"]}),
            ),
            Walk::Post(150, &["metadata.uid"]),
            true,
        ),
        (
            post(
                "/entities/by-query",
                json!({"query": {"spec.type": {"$exists": true}},
                       "orderBy": [{"field": "spec.type", "order": "desc"}], "limit": 90,
                       "fields": ["metadata.uid", "spec.type"]}),
            ),
            Walk::Post(90, &["metadata.uid", "spec.type"]),
            true,
        ),
    ];
    for (first, how, predicate) in &walks {
        let label = format!(
            "{} {}",
            first.path,
            first.body.as_ref().map(short).unwrap_or_default()
        );
        let up = walk(&pair, Side::Upstream, first, *how).await;
        let side = walk(&pair, Side::Sidecar, first, *how).await;
        assert_eq!(up.len(), side.len(), "{label}: page counts");
        assert!(up.len() > 2, "{label}: the walk spans several pages");
        let mut seen = HashSet::new();
        for (i, (a, b)) in up.iter().zip(&side).enumerate() {
            if let Some(why) = difference(&a.reply, &b.reply, true) {
                panic!("{label}: page {i}: {why}");
            }
            assert_eq!(a.prev.is_some(), i > 0, "{label}: page {i} prevCursor");
            for uid in uids(b.items()) {
                assert!(seen.insert(uid.clone()), "{label}: {uid} seen twice");
            }
            // The official client routes a cursor to POST exactly when it
            // carries a top-level `query`.
            if let Some(next) = &b.next {
                let state = decode_cursor(next);
                assert_eq!(state.get("query").is_some(), *predicate, "{label}: {state}");
                assert!(
                    state.get("fields").is_none() && state.get("limit").is_none(),
                    "{state}"
                );
            }
        }
        // Cursors are Backstage-shaped on both sides, so a sidecar cursor
        // continues on the upstream to the same page.
        let crossed = Page::of(
            pair.upstream(&how.next(side[0].next.as_ref().unwrap()))
                .await,
        );
        if let Some(why) = difference(&side[1].reply, &crossed.reply, true) {
            panic!("{label}: a sidecar cursor on the upstream: {why}");
        }
        // A cursor is accepted by both methods: each side continues its own
        // cursor through GET and through POST alike.
        for other in [
            Walk::Get("limit=10&fields=metadata.uid"),
            Walk::Post(10, &["metadata.uid"]),
        ] {
            let (a, b) = (
                pair.upstream(&other.next(up[0].next.as_ref().unwrap()))
                    .await,
                pair.sidecar(&other.next(side[0].next.as_ref().unwrap()))
                    .await,
            );
            assert_eq!(b.status, 200, "{label}: {}", short(&b.body));
            if let Some(why) = difference(&a, &b, true) {
                panic!("{label}: a cursor through the other method: {why}");
            }
        }
        let total = side[0].reply.body["totalItems"].as_u64().unwrap() as usize;
        assert_eq!(
            seen.len(),
            total,
            "{label}: the walk sees totalItems entities"
        );
        // Back from the last page with prevCursor: the same pages, reversed.
        let mut back = Vec::new();
        let (mut a_cursor, mut b_cursor) = (
            up.last().unwrap().prev.clone(),
            side.last().unwrap().prev.clone(),
        );
        while let (Some(ac), Some(bc)) = (a_cursor.take(), b_cursor.take()) {
            let (a, b) = (
                Page::of(pair.upstream(&how.next(&ac)).await),
                Page::of(pair.sidecar(&how.next(&bc)).await),
            );
            if let Some(why) = difference(&a.reply, &b.reply, true) {
                panic!("{label}: backwards: {why}");
            }
            back.push(uids(b.items()));
            assert!(back.len() <= side.len(), "{label}: backwards never ends");
            (a_cursor, b_cursor) = (a.prev, b.prev);
        }
        assert!(
            a_cursor.is_none() && b_cursor.is_none(),
            "{label}: prevCursor on one side only"
        );
        back.reverse();
        let forward: Vec<Vec<String>> = side[..side.len() - 1]
            .iter()
            .map(|p| uids(p.items()))
            .collect();
        assert_eq!(
            back, forward,
            "{label}: prevCursor pages are the forward pages"
        );
    }

    // GET /entities: follow the Link header on each side.
    for first in [
        "/entities?limit=211&fields=metadata.uid,metadata.name",
        "/entities?limit=150&offset=20&order=asc:spec.lifecycle&order=desc:metadata.name&fields=metadata.uid&filter=kind=component&filter=kind=api",
    ] {
        let mut seen = Vec::new();
        let (mut a_next, mut b_next) = (Some(first.to_string()), Some(first.to_string()));
        let mut pages = 0;
        while let (Some(a_path), Some(b_path)) = (a_next.take(), b_next.take()) {
            let (a, b) = (pair.upstream(&get(&a_path)).await, pair.sidecar(&get(&b_path)).await);
            if let Some(why) = difference(&a, &b, true) {
                panic!("{first}: page {pages}: {why}");
            }
            seen.extend(uids(b.body.as_array().unwrap()));
            let follow = |link: &Option<String>| {
                link.as_deref().map(|l| {
                    let target = l.trim_start_matches('<').split('>').next().unwrap();
                    target.strip_prefix("/entities").map(|rest| format!("/entities{rest}")).expect("Link is relative to the plugin mount")
                })
            };
            (a_next, b_next) = (follow(&a.link), follow(&b.link));
            assert_eq!(a_next.is_some(), b_next.is_some(), "{first}: Link on one side only");
            pages += 1;
            assert!(pages < 100);
        }
        assert!(pages > 2, "{first}: several pages");
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{first}: an entity seen twice");
    }
}

fn new_component(name: &str, owner: &str) -> Value {
    json!({
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": name, "namespace": "default", "tags": ["java"], "description": "added mid-walk"},
        "spec": {"type": "service", "lifecycle": "production", "owner": owner},
        "relations": [],
    })
}

/// A walk started on one generation and continued with its old cursor on the
/// next: every entity present in both generations is seen exactly once.
/// Checked for a GET walk by name, a GET walk in default (uid) order and a
/// POST predicate walk by a field some entities lack, all three paused across
/// the same sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walks_survive_a_sync() {
    let pair = Pair::start().await;
    let walks: Vec<(Req, Walk)> = vec![
        (
            get("/entities/by-query?limit=100&orderField=metadata.name,asc&fields=metadata.uid"),
            Walk::Get("limit=100&fields=metadata.uid"),
        ),
        (
            get("/entities/by-query?limit=120&fields=metadata.uid"),
            Walk::Get("limit=120&fields=metadata.uid"),
        ),
        (
            post(
                "/entities/by-query",
                json!({"query": {"$not": {"kind": "group"}},
                       "orderBy": [{"field": "spec.lifecycle", "order": "desc"}],
                       "limit": 110, "fields": ["metadata.uid"]}),
            ),
            Walk::Post(110, &["metadata.uid"]),
        ),
    ];
    let before: HashSet<String> = pair
        .fake
        .entities()
        .iter()
        .map(|e| e["metadata"]["uid"].as_str().unwrap().to_string())
        .collect();
    // What each walk selects on the first generation, walked whole.
    let mut selected_before = Vec::new();
    for (first, how) in &walks {
        let pages = walk(&pair, Side::Sidecar, first, *how).await;
        selected_before.push(
            pages
                .iter()
                .flat_map(|p| uids(p.items()))
                .collect::<HashSet<_>>(),
        );
    }
    // The first pages, on the first generation.
    let mut started = Vec::new();
    for (first, how) in &walks {
        let mut pages = vec![Page::of(pair.sidecar(first).await)];
        for _ in 0..4 {
            let next = pages.last().unwrap().next.clone().expect("a long walk");
            pages.push(Page::of(pair.sidecar(&how.next(&next)).await));
        }
        started.push(pages);
    }

    // Change the upstream, never on a sort field: touch and edit entities on
    // both sides of every walk's position, add a few, remove a few.
    let all = pair.fake.entities();
    let owner = sample(&all).group_ref;
    let mut removed = HashSet::new();
    for (i, e) in all.iter().enumerate() {
        let uid = e["metadata"]["uid"].as_str().unwrap();
        match i % 97 {
            0 => {
                pair.fake.touch(uid).expect("touch");
            }
            1 => {
                pair.fake
                    .update_entity(uid, |e| {
                        e["metadata"]["description"] = json!("edited mid-walk")
                    })
                    .expect("update");
            }
            2 if removed.len() < 8 => {
                removed.insert(uid.to_string());
            }
            _ => {}
        }
    }
    assert_eq!(
        pair.fake
            .remove_entities(|e| removed.contains(e["metadata"]["uid"].as_str().unwrap())),
        removed.len()
    );
    pair.fake.add_entities(
        [
            "aaa-added-1",
            "Checkout-Added-2",
            "mmm-added-3",
            "zzz-added-4",
            "payments-added-5",
        ]
        .iter()
        .map(|n| new_component(n, &owner))
        .collect(),
    );
    let report = pair.sync().await;
    assert_eq!(report["result"], "applied", "{report}");
    assert_eq!(report["added"], 5, "{report}");
    assert_eq!(report["removed"], removed.len(), "{report}");
    let after: HashSet<String> = pair
        .fake
        .entities()
        .iter()
        .map(|e| e["metadata"]["uid"].as_str().unwrap().to_string())
        .collect();

    for (((first, how), mut pages), selected_before) in
        walks.iter().zip(started).zip(selected_before)
    {
        let label = format!(
            "{} {}",
            first.path,
            first.body.as_ref().map(short).unwrap_or_default()
        );
        let selected_after: HashSet<String> = walk(&pair, Side::Sidecar, first, *how)
            .await
            .iter()
            .flat_map(|p| uids(p.items()))
            .collect();
        let in_both: HashSet<&String> = selected_before.intersection(&selected_after).collect();
        assert!(in_both.len() > 1000, "{label}: {} in both", in_both.len());
        while let Some(next) = pages.last().unwrap().next.clone() {
            assert!(pages.len() < 100, "{label}: a walk that never ends");
            pages.push(Page::of(pair.sidecar(&how.next(&next)).await));
        }
        let mut seen = std::collections::HashMap::<String, usize>::new();
        for page in &pages {
            for uid in uids(page.items()) {
                *seen.entry(uid).or_default() += 1;
            }
        }
        for uid in &in_both {
            assert_eq!(
                seen.get(*uid).copied(),
                Some(1),
                "{label}: {uid}, present in both generations"
            );
        }
        for (uid, n) in &seen {
            assert_eq!(*n, 1, "{label}: {uid} seen {n} times");
            assert!(
                before.contains(uid) || after.contains(uid),
                "{label}: {uid} from nowhere"
            );
        }
        // Pages after the sync come from the new generation.
        for page in &pages[5..] {
            for uid in uids(page.items()) {
                assert!(
                    !removed.contains(&uid),
                    "{label}: removed {uid} served after the sync"
                );
            }
        }
    }

    // The new generation answers like the changed upstream.
    for req in [
        get("/entities?limit=40&filter=kind=component&fields=metadata.name,metadata.description"),
        get("/entities/by-query?limit=30&orderField=metadata.name,asc&filter=metadata.tags=java&fields=metadata.name"),
        post("/entities/by-query", json!({"query": {"metadata.description": "edited mid-walk"}, "fields": ["metadata.uid"]})),
        get("/entity-facets?facet=metadata.description&filter=kind=component"),
    ] {
        let (a, b) = (pair.upstream(&req).await, pair.sidecar(&req).await);
        if let Some(why) = difference(&a, &b, true) {
            panic!("after the sync: {} {}: {why}", req.path, req.body.as_ref().map(short).unwrap_or_default());
        }
        assert!(b.body != json!([]) && b.body["items"] != json!([]), "{}: an answer to compare", req.path);
    }
}
