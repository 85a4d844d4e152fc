//! Query latency over a generated 100,000-entity catalog (about 1.5 KB per
//! entity, with kinds, tags, annotations and relations), plus the index's
//! build time and memory per 10,000 entities, printed before the timings.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use catalog_cache::entity::Entity;
use catalog_cache::index::{Index, IndexLimits};
use catalog_cache::query::{answer, Answer, Budget, QueryError, QueryKind, QueryRequest};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

const ENTITIES: usize = 100_000;

/// A small deterministic generator (no seed files, same catalog every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() as usize) % xs.len()]
    }
}

fn generate(n: usize) -> Vec<Arc<Entity>> {
    let mut rng = Lcg(42);
    let tags = [
        "java",
        "go",
        "rust",
        "python",
        "typescript",
        "kafka",
        "postgres",
        "redis",
        "grpc",
        "rest",
        "payments",
        "search",
        "checkout",
        "ml",
        "batch",
        "frontend",
        "backend",
        "infra",
        "security",
        "observability",
        "pci",
        "gdpr",
        "tier-1",
        "tier-2",
        "tier-3",
        "legacy",
        "beta",
        "internal",
        "public",
        "mobile",
    ];
    (0..n)
        .map(|i| {
            let roll = rng.next() % 100;
            let kind = match roll {
                0..=59 => "Component",
                60..=74 => "API",
                75..=79 => "Resource",
                80..=84 => "System",
                85..=94 => "Group",
                _ => "User",
            };
            let team = rng.next() % 400;
            let system = rng.next() % 200;
            let dep1 = rng.next() % n as u64;
            let dep2 = rng.next() % n as u64;
            let t: Vec<&str> = (0..3).map(|_| rng.pick(&tags)).collect();
            let uid = format!("{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}", rng.next(), i % 65536, i % 4096, rng.next() % 4096, i);
            let body = json!({
                "apiVersion": "backstage.io/v1alpha1",
                "kind": kind,
                "metadata": {
                    "name": format!("Checkout-Service-{i:06}"),
                    "namespace": "default",
                    "uid": uid,
                    "etag": format!("{:016x}", rng.next()),
                    "title": format!("Checkout service number {i}"),
                    "description": format!("Service {i} handles a slice of the checkout flow for team {team}; it talks to the payment gateway, the fraud scorer and the order ledger, and publishes events for downstream analytics consumers."),
                    "tags": t,
                    "labels": {"tier": rng.pick(&["1", "2", "3"]), "region": rng.pick(&["eu", "us", "ap"])},
                    "annotations": {
                        "backstage.io/managed-by-location": format!("url:https://git.example.com/org/repo-{i}/blob/main/catalog-info.yaml"),
                        "backstage.io/managed-by-origin-location": "url:https://git.example.com/org/catalog/blob/main/all.yaml",
                        "backstage.io/techdocs-ref": "dir:.",
                        "github.com/project-slug": format!("org/repo-{i}"),
                        "pagerduty.com/service-id": format!("P{:06X}", rng.next() % 0xFFFFFF)
                    }
                },
                "spec": {
                    "type": rng.pick(&["service", "website", "library", "openapi", "grpc"]),
                    "lifecycle": rng.pick(&["production", "experimental", "deprecated"]),
                    "owner": format!("group:default/team-{team:04}"),
                    "system": format!("system-{system:03}"),
                    "dependsOn": [format!("component:default/checkout-service-{dep1:06}"), format!("resource:default/db-{dep2:06}")]
                },
                "relations": [
                    {"type": "ownedBy", "targetRef": format!("group:default/team-{team:04}")},
                    {"type": "partOf", "targetRef": format!("system:default/system-{system:03}")},
                    {"type": "dependsOn", "targetRef": format!("component:default/checkout-service-{dep1:06}")},
                    {"type": "dependsOn", "targetRef": format!("resource:default/db-{dep2:06}")}
                ],
                "status": {"items": []}
            });
            Arc::new(Entity::from_json(Bytes::from(body.to_string())).expect("generated entity"))
        })
        .collect()
}

/// Resident memory of this process (Linux), 0 elsewhere.
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn bench(c: &mut Criterion) {
    let rss_before_generate = resident_bytes();
    let entities = generate(ENTITIES);
    let rss_with_bodies = resident_bytes();
    let bodies: usize = entities.iter().map(|e| e.body_len()).sum();
    let started = Instant::now();
    for e in &entities {
        let _: serde_json::Value = serde_json::from_slice(&e.body()).expect("valid");
    }
    println!(
        "parsing every body once (single thread): {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let index = Index::build(1, entities, &IndexLimits::default());
    index.wait_query_ready();
    let built = started.elapsed();
    // Warm the sort column the by-query cases use, so memory includes it.
    let _ = answer(
        &index,
        &QueryRequest {
            kind: QueryKind::GetByQuery,
            query_string: "limit=1&orderField=metadata.name,asc",
            body: b"",
        },
        &Budget::unlimited(),
    );
    let memory = index.approximate_memory_bytes();
    let rss_indexed = resident_bytes();
    println!(
        "resident set: +{:.1} MiB for the entities, +{:.1} MiB more once indexed (cross-check; includes allocator slack)",
        (rss_with_bodies.saturating_sub(rss_before_generate)) as f64 / 1048576.0,
        (rss_indexed.saturating_sub(rss_with_bodies)) as f64 / 1048576.0,
    );
    println!(
        "index: {} entities, mean body {} B, built in {:?}, memory {:.1} MiB total, {:.1} MiB per 10,000 entities (bodies {:.1} MiB per 10,000)",
        index.len(),
        bodies / index.len(),
        built,
        memory as f64 / 1048576.0,
        memory as f64 / 1048576.0 / (index.len() as f64 / 10_000.0),
        bodies as f64 / 1048576.0 / (index.len() as f64 / 10_000.0),
    );

    let any_contains = format!(
        r#"{{"query":{{"$any":[{}]}},"limit":200}}"#,
        vec![r#"{"metadata.tags":{"$contains":"x"}}"#; 1000].join(",")
    );
    let cases: [(&str, QueryKind, &str, &str); 11] = [
        (
            "selective filter (GET /entities, 1 hit)",
            QueryKind::GetEntities,
            "filter=kind=component,metadata.name=checkout-service-012345",
            "",
        ),
        (
            "relation filter (GET /entities, ~150 hits)",
            QueryKind::GetEntities,
            "filter=relations.ownedby=group:default/team-0042",
            "",
        ),
        (
            "broad filter (GET /entities kind=component, all ~60k bodies)",
            QueryKind::GetEntities,
            "filter=kind=component",
            "",
        ),
        (
            "broad filter (by-query kind=component, ordered, limit 200)",
            QueryKind::GetByQuery,
            "filter=kind=component&orderField=metadata.name,asc&limit=200",
            "",
        ),
        (
            "broad filter (by-query, default order, limit 500)",
            QueryKind::GetByQuery,
            "filter=kind=component&limit=500",
            "",
        ),
        (
            "$any/$not predicate (POST by-query, limit 200)",
            QueryKind::PostByQuery,
            "",
            r#"{"query":{"$all":[{"$any":[{"kind":"component"},{"kind":"api"}]},{"$not":{"spec.lifecycle":"deprecated"}},{"metadata.tags":{"$in":["java","go"]}}]},"limit":200}"#,
        ),
        (
            "full text (by-query term on metadata.name, limit 200)",
            QueryKind::GetByQuery,
            "fullTextFilterTerm=service-0123&fullTextFilterFields=metadata.name&limit=200",
            "",
        ),
        (
            "facets (kind + metadata.tags, filter spec.lifecycle)",
            QueryKind::GetFacets,
            "facet=kind&facet=metadata.tags&filter=spec.lifecycle=production",
            "",
        ),
        (
            "$any of 1,000 $contains (POST by-query, 1 s budget)",
            QueryKind::PostByQuery,
            "",
            &any_contains,
        ),
        (
            "relations $contains type/targetRef (POST by-query, limit 200)",
            QueryKind::PostByQuery,
            "",
            r#"{"query":{"relations":{"$contains":{"type":"ownedBy","targetRef":"group:default/team-0042"}}},"limit":200}"#,
        ),
        (
            "ordered with fields (by-query kind=component by metadata.name, 2 fields, limit 200)",
            QueryKind::GetByQuery,
            "filter=kind=component&orderField=metadata.name,asc&fields=metadata.name,spec.owner&limit=200",
            "",
        ),
    ];
    // Every case is timed to its last byte, within the budget a sidecar
    // would give it.
    let ask = |req: &QueryRequest<'_>| -> Result<bytes::Bytes, QueryError> {
        answer(&index, req, &Budget::new(std::time::Duration::from_secs(1)))
            .and_then(|a: Answer| a.body.into_bytes())
    };
    let mut group = c.benchmark_group("query_100k");
    for (name, kind, qs, body) in cases {
        let req = QueryRequest {
            kind,
            query_string: qs,
            body: body.as_bytes(),
        };
        ask(&req).expect("bench query is valid");
        group.bench_function(name, |b| b.iter(|| ask(&req).expect("valid")));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
