//! No client can stall, bloat or misdirect the sidecar: paths that could
//! address something else, client mistakes and the breaker, connection
//! timeouts and caps, in-flight limits, operator input out of range, stored
//! answers, upstream calls in flight and peer seeding — each over real HTTP
//! (raw sockets where a client library would tidy the request up).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use catalog_cache::clock::Clock;
use catalog_cache::config::Dur;
use catalog_fake::Faults;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Sends raw bytes to `addr` and reads until the server closes or `within`
/// passes; returns what came back and whether the server closed.
async fn raw(addr: std::net::SocketAddr, request: &[u8], within: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_could_address_something_else_are_answered_here_and_never_forwarded() {
    let ts = TestSidecar::builder().start().await;
    let before = ts.fake.stats().total;
    for path in [
        "/api/catalog/locations/../../../admin/secret",
        "/api/catalog/locations/%2e%2e/%2E%2E/admin/secret",
        "/api/catalog/entities/by-uid/a%2Fb",
        "/api/catalog/entities/by-uid/a\\b",
        "/api/catalog//entities",
        "/api/catalog/entities/by-uid/%zz",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (response, _) = raw(ts.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&response), 400, "{path}: {response}");
        assert!(response.contains("InputError"), "{path}: {response}");
        assert!(
            response.contains("Invalid request path"),
            "{path}: {response}"
        );
    }
    for (method, path) in [
        ("GET", "/api/catalog/admin/secret"),
        ("POST", "/api/catalog/entities/by-name/component/default/x"),
        ("PUT", "/api/catalog/entities"),
    ] {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let (response, _) = raw(ts.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&response), 404, "{method} {path}: {response}");
        assert!(response.contains("NotFoundError"), "{response}");
    }
    assert_eq!(
        ts.fake.stats().total,
        before,
        "none of these may reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_carry_the_callers_credentials_never_the_sidecars() {
    let ts = TestSidecar::builder()
        .with(|b| b.upstream_token = Some("sidecar-token".into()))
        .start()
        .await;
    // The demo catalog wants the sidecar's token: a write without the
    // caller's own credentials is not sent with the sidecar's.
    let write = ts
        .post("/refresh", &json!({"entityRef": "component:default/x"}))
        .await;
    assert_eq!(
        write.status,
        401,
        "{}",
        String::from_utf8_lossy(&write.body)
    );
    let authorized = ts
        .http
        .post(ts.url("/refresh"))
        .bearer_auth("sidecar-token")
        .json(&json!({"entityRef": "component:default/x"}))
        .send()
        .await
        .unwrap();
    assert_ne!(
        authorized.status(),
        401,
        "the caller's own token is passed on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_and_write_failures_never_move_the_breaker() {
    let ts = TestSidecar::builder()
        .with(|b| b.consecutive_failures = 3)
        .start()
        .await;
    // Every answer a 500 or 503: writes pass the upstream's answer on (it
    // was sent), and it counts for nothing.
    ts.faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    for _ in 0..10 {
        let a = ts
            .post("/refresh", &json!({"entityRef": "component:default/x"}))
            .await;
        assert!(a.status == 500 || a.status == 503, "{}", a.status);
        assert_eq!(a.cache_status(), "catalog-cache; fwd=bypass");
        assert!(!String::from_utf8_lossy(&a.body).contains("was not sent"));
    }
    assert_eq!(ts.status().await["breaker"]["state"], "closed");
    ts.faults(Faults::default()).await;
    // The client's own malformed requests: answered 400, never sent.
    for _ in 0..10 {
        let a = ts
            .post("/entities/by-refs", &json!({"entityRefs": 7}))
            .await;
        assert_eq!(a.status, 400);
    }
    // A write the upstream refuses as the client's fault (400): passed on.
    for _ in 0..10 {
        let a = ts.post("/locations", &json!({"nonsense": true})).await;
        assert!(a.status >= 400 && a.status < 500, "{}", a.status);
    }
    let status = ts.status().await;
    assert_eq!(status["breaker"]["state"], "closed", "{status:#}");
    assert_eq!(status["breaker"]["consecutive_failures"], 0, "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_header_is_cut_off_after_the_header_read_timeout() {
    let ts = TestSidecar::builder()
        .configure(|c| c.listen.header_read_timeout = Dur(Duration::from_millis(300)))
        .start()
        .await;
    let started = Instant::now();
    let (_, closed) = raw(
        ts.proxy,
        b"GET /api/catalog/entities HTTP/1.1\r\nHost: lo",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "the connection was held open");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // And a connection that sends nothing at all.
    let (_, closed) = raw(ts.proxy, b"", Duration::from_secs(5)).await;
    assert!(closed, "a silent connection was held open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_answered_408_and_closed() {
    let ts = TestSidecar::builder()
        .configure(|c| c.listen.body_read_timeout = Dur(Duration::from_millis(300)))
        .start()
        .await;
    let request = b"POST /api/catalog/entities/by-refs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
    let (response, closed) = raw(ts.proxy, request, Duration::from_secs(5)).await;
    assert_eq!(status_of(&response), 408, "{response}");
    assert!(response.contains("listen.body_read_timeout"), "{response}");
    assert!(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_moves_no_byte_is_closed_after_the_idle_timeout() {
    let ts = TestSidecar::builder()
        .configure(|c| {
            c.listen.header_read_timeout = Dur(Duration::from_secs(30));
            c.listen.idle_timeout = Dur(Duration::from_millis(300));
        })
        .start()
        .await;
    let started = Instant::now();
    let (_, closed) = raw(ts.proxy, b"", Duration::from_secs(5)).await;
    assert!(closed, "an idle connection was held open");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_and_the_admin_listener_keeps_answering() {
    let ts = TestSidecar::builder()
        .configure(|c| {
            c.listen.proxy_max_connections = 4;
            c.listen.header_read_timeout = Dur(Duration::from_secs(30));
        })
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let s = TcpStream::connect(ts.proxy).await.unwrap();
        held.push(s);
    }
    // Give the server the moment it needs to accept those four.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fifth connection is not served while the four hold their slots...
    let fifth = tokio::spawn({
        let addr = ts.proxy;
        async move {
            raw(
                addr,
                b"GET /api/catalog/entity-facets?facet=kind HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                Duration::from_secs(10),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fifth.is_finished(),
        "a connection beyond the cap was served"
    );
    // ...while the admin listener, with slots of its own, answers.
    let started = Instant::now();
    assert_eq!(ts.admin_get("/livez").await.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    // A slot frees: the fifth is served.
    drop(held.pop());
    let (response, _) = fifth.await.unwrap();
    assert_eq!(status_of(&response), 200, "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_limit_are_shed_with_a_503_naming_it() {
    let ts = TestSidecar::builder()
        .configure(|c| c.listen.proxy_max_in_flight = 1)
        .start()
        .await;
    // Old data and a black-holed upstream: each read waits its full budget.
    ts.faults(Faults {
        black_hole: true,
        ..Faults::default()
    })
    .await;
    ts.age_past_fresh(Duration::from_secs(1));
    let entities = ts.upstream_entities();
    let slow = {
        let url = ts.url(&by_name_path(&entities[0]));
        let http = ts.http.clone();
        tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let shed = ts.get(&by_name_path(&entities[1])).await;
    assert_eq!(shed.status, 503, "{}", String::from_utf8_lossy(&shed.body));
    assert!(
        String::from_utf8_lossy(&shed.body).contains("listen.proxy_max_in_flight"),
        "{}",
        String::from_utf8_lossy(&shed.body)
    );
    assert_eq!(shed.header("retry-after"), "1");
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_for_clients_are_bounded_in_number() {
    let ts = TestSidecar::builder()
        .with(|b| b.budget = Duration::from_millis(200))
        .configure(|c| c.upstream.max_in_flight = 2)
        .start()
        .await;
    ts.faults(Faults {
        black_hole: true,
        ..Faults::default()
    })
    .await;
    ts.age_past_fresh(Duration::from_secs(1));
    let before = ts.fake.stats().total;
    let entities = ts.upstream_entities();
    let reads: Vec<_> = entities
        .iter()
        .take(20)
        .map(|e| {
            let url = ts.url(&by_name_path(e));
            let http = ts.http.clone();
            tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap(), 200, "each read is served from the mirror");
    }
    let sent = ts.fake.stats().total - before;
    assert!(
        sent <= 2,
        "{sent} upstream calls in flight at once, bound 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_input_out_of_range_is_refused_naming_the_limit() {
    let ts = TestSidecar::builder().start().await;
    for (path, body, limit) in [
        (
            "/admin/breaker",
            json!({"mode": "open", "for": "10000y"}),
            "at most 7 days",
        ),
        (
            "/admin/breaker",
            json!({"mode": "open", "for": "0s"}),
            "write e.g.",
        ),
        (
            "/admin/stale",
            json!({"policy": "serve", "max_stale": "1000y"}),
            "from 1s to 365 days",
        ),
        (
            "/admin/breaker",
            json!({"mode": "open", "reason": "x".repeat(501)}),
            "at most 500",
        ),
    ] {
        let a = ts
            .admin_send(reqwest::Method::PUT, path, Some(ADMIN_TOKEN), Some(body))
            .await;
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
        let message = a.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(message.contains(limit), "{message}");
    }
    // Nothing changed, and everything still answers.
    let status = ts.status().await;
    assert_eq!(status["breaker"]["mode"], "auto");
    assert_eq!(ts.admin_get("/admin/breaker").await.status, 200);
    let huge = ts
        .admin_send(
            reqwest::Method::PUT,
            "/admin/stale",
            Some(ADMIN_TOKEN),
            Some(json!({"policy": "serve", "reason": "y".repeat(100_000)})),
        )
        .await;
    assert_eq!(huge.status, 413, "admin bodies are small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_override_out_of_range_is_repaired_at_load() {
    let ts = TestSidecar::builder().start().await;
    ts.set_breaker(json!({"mode": "open", "reason": "test", "for": "1h"}))
        .await;
    let db = ts.db_path();
    let ts = {
        let mut ts = ts;
        ts.stop().await;
        // As an older version, or a hand edit, could have left it: an
        // expiry ten thousand years away.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute(
            "UPDATE flags SET expires_ms = 9000000000000000 WHERE name = 'breaker_mode'",
            [],
        )
        .unwrap();
        drop(conn);
        ts.restart().await
    };
    let status = ts.status().await;
    assert_eq!(status["breaker"]["mode"], "open", "{status:#}");
    let expires = status["breaker"]["mode_expires_at"]
        .as_str()
        .unwrap()
        .to_string();
    let expires = humantime::parse_rfc3339(&expires).unwrap();
    let week = std::time::SystemTime::now() + Duration::from_secs(7 * 24 * 3600 + 60);
    assert!(expires <= week, "expiry pulled in: {expires:?}");
    assert!(
        status["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["actor"] == "repair"),
        "{status:#}"
    );
    assert_eq!(ts.admin_get("/admin/breaker").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_read_through_answers_are_bounded() {
    let ts = TestSidecar::builder()
        .configure(|c| c.read_through.max_entries = 5)
        .start()
        .await;
    for i in 0..20 {
        let a = ts.get(&format!("/locations?page={i}")).await;
        assert_eq!(a.status, 200);
    }
    let db = ts.db_path();
    let count = || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("SELECT COUNT(*) FROM read_through", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
    };
    eventually("the stores to land", WAIT, || async { count() > 0 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(count() <= 5, "{} stored answers, bound 5", count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_sends_the_peers_token_and_a_wrong_one_falls_back_to_syncing() {
    let peer = TestSidecar::builder().start().await;
    // A new sidecar with an admin token of its own: seeding with that fails
    // (401) and it syncs from the upstream instead.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut config = peer
        .builder_used()
        .config(&peer.fake.base_url(), dir.path());
    config.mirror.seed_from = format!("http://{}", peer.admin);
    config.admin.token = Some("another-token".into());
    let unseeded = peer.sibling(dir, config, Clock::system()).await;
    unseeded.wait_for_first_sync().await;
    let sources = |db: &std::path::Path| -> Vec<String> {
        let conn = rusqlite::Connection::open(db).unwrap();
        let mut stmt = conn
            .prepare("SELECT source FROM generations ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(sources(&unseeded.db_path())[0], "sync");
    // With the peer's token in mirror.seed_token_file, it seeds.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let token_file = dir.path().join("peer.token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let mut config = peer
        .builder_used()
        .config(&peer.fake.base_url(), dir.path());
    config.mirror.seed_from = format!("http://{}", peer.admin);
    config.mirror.seed_token_file = token_file;
    config.admin.token = Some("another-token".into());
    let seeded = peer.sibling(dir, config, Clock::system()).await;
    seeded.wait_for_first_sync().await;
    assert_eq!(sources(&seeded.db_path())[0], "seed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_confirmed_in_the_future_is_taken_as_confirmed_now() {
    let ts = TestSidecar::builder().start().await;
    let snapshot = ts
        .admin_send(
            reqwest::Method::GET,
            "/admin/snapshot",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(snapshot.status, 200);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("future.db");
    std::fs::write(&file, &snapshot.body).unwrap();
    {
        let conn = rusqlite::Connection::open(&file).unwrap();
        // A year from now.
        let future = catalog_cache::mirror::to_ms(
            std::time::SystemTime::now() + Duration::from_secs(365 * 24 * 3600),
        );
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'synced_ms'",
            [future.to_string()],
        )
        .unwrap();
    }
    let clock = Clock::system();
    let (mirror, _) =
        catalog_cache::mirror::Mirror::open(&dir.path().join("m.db"), &clock).unwrap();
    let (meta, _) = catalog_cache::snapshot::import_into(
        &mirror,
        &file,
        &Default::default(),
        "snapshot",
        clock.now(),
    )
    .unwrap();
    assert!(meta.synced_at <= clock.now(), "clamped to now");
    let value: Value = ts.status().await;
    assert_eq!(value["ready"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_budget_is_stopped_with_a_503_naming_the_limit() {
    let ts = TestSidecar::builder()
        .with(|b| b.entities = 3000)
        .configure(|c| c.proxy.query_budget = Dur(Duration::from_millis(50)))
        .start()
        .await;
    // `$not` inside `$contains` tells the index nothing: each of the 1,000
    // branches reads every body (seconds of work without a budget).
    let branch = json!({"metadata.tags": {"$contains": {"$not": {"$not": "x"}}}});
    let body = json!({"query": {"$any": vec![branch; 1000]}});
    let started = Instant::now();
    let answer = ts.post("/entities/by-query", &body).await;
    let took = started.elapsed();
    assert_eq!(
        answer.status,
        503,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let error = answer.json();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("proxy.query_budget"),
        "{error:#}"
    );
    assert_eq!(answer.header("retry-after"), "1");
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    // Health is unaffected, and ordinary reads still answer.
    let health = ts.admin_get("/readyz").await;
    assert_eq!(health.status, 200);
    let entity = ts.upstream_entities()[0].clone();
    assert_eq!(ts.get(&by_name_path(&entity)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_unpaged_list_is_streamed_and_equals_the_catalogs() {
    let ts = TestSidecar::builder()
        .with(|b| b.entities = 1500)
        .start()
        .await;
    let response = ts
        .http
        .get(ts.url("/entities"))
        .send()
        .await
        .expect("the proxy answers");
    assert_eq!(response.status(), 200);
    // Streamed: no length known up front.
    assert!(
        response.headers().get("content-length").is_none(),
        "{:?}",
        response.headers()
    );
    let body = response.bytes().await.expect("the whole body arrives");
    let ours: Value = serde_json::from_slice(&body).expect("valid JSON");
    let theirs = ts.get_upstream("/entities").await.json();
    assert_eq!(ours.as_array().map(Vec::len), Some(1500));
    assert_eq!(ours, theirs);
    // by-refs of every entity: streamed too, in the order asked.
    let refs: Vec<String> = ts.upstream_entities().iter().map(canonical_ref).collect();
    let ours = ts
        .post("/entities/by-refs", &json!({"entityRefs": refs}))
        .await;
    let theirs = ts
        .post_upstream("/entities/by-refs", &json!({"entityRefs": refs}))
        .await;
    assert_eq!(ours.status, 200);
    assert!(ours.headers.get("content-length").is_none());
    assert_eq!(ours.json(), theirs.json());
}
