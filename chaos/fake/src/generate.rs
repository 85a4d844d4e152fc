//! Deterministic generator of realistic Backstage entities.
//!
//! `generate(n, seed)` is what the demo catalog serves and what tests compare
//! against: the same `(n, seed)` always yields byte-identical entities. The
//! random source is a local SplitMix64 so that the output never changes with a
//! dependency upgrade. Relations are emitted in both directions, as Backstage
//! does, with lower-cased full refs as targets.

use serde_json::{json, Map, Value};

/// A tiny, stable pseudo-random source (SplitMix64).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; `n` must be non-zero.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// A uuid-v4-shaped identifier drawn from `rng`.
pub(crate) fn uuid(rng: &mut SplitMix) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        (a as u16) & 0x0fff,
        (((b >> 48) as u16) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// A stable 64-bit hash of bytes (FNV-style, a word at a time); used for
/// etags and derived uids, which only need to change with their input.
pub(crate) fn fnv1a(bytes: &[u8], salt: u64) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(buf))
            .wrapping_mul(PRIME)
            .rotate_left(29);
    }
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
    }
    h ^ (h >> 32)
}

/// Computes an etag for `entity` from its content (ignoring any current etag)
/// and `salt`; different content or salt gives a different etag.
pub fn compute_etag(entity: &Value, salt: u64) -> String {
    let mut copy = entity.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("etag");
    }
    let text = copy.to_string().into_bytes();
    let h1 = fnv1a(&text, salt);
    let h2 = fnv1a(&text, salt.rotate_left(17) ^ 0xA5A5);
    format!("{h1:016x}{h2:016x}")
}

/// The full lower-cased ref `kind:namespace/name` of an entity, as Backstage
/// stores it (`component:default/checkout-service-00100`).
pub fn entity_ref(entity: &Value) -> Option<String> {
    let kind = entity.get("kind")?.as_str()?;
    let meta = entity.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    Some(format!("{kind}:{namespace}/{name}").to_lowercase())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Domain,
    System,
    Component,
    Api,
    Resource,
    Group,
    User,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Domain => "Domain",
            Kind::System => "System",
            Kind::Component => "Component",
            Kind::Api => "API",
            Kind::Resource => "Resource",
            Kind::Group => "Group",
            Kind::User => "User",
        }
    }
}

const WORDS: &[&str] = &[
    "checkout",
    "payments",
    "billing",
    "search",
    "catalog",
    "inventory",
    "shipping",
    "orders",
    "identity",
    "profile",
    "ledger",
    "pricing",
    "reviews",
    "media",
    "notify",
    "gateway",
    "analytics",
    "fraud",
    "loyalty",
    "cart",
    "session",
    "routing",
    "audit",
    "reporting",
];
const SUFFIXES: &[&str] = &["service", "api", "worker", "web", "backend", "job", "proxy"];
const TAGS: &[&str] = &[
    "java",
    "go",
    "python",
    "grpc",
    "rest",
    "kotlin",
    "rust",
    "typescript",
    "kafka",
    "postgres",
    "redis",
    "graphql",
    "react",
    "spring",
    "node",
];
const LIFECYCLES: &[&str] = &[
    "production",
    "production",
    "production",
    "experimental",
    "deprecated",
];
const COMPONENT_TYPES: &[&str] = &["service", "service", "service", "website", "library"];
const API_TYPES: &[&str] = &["openapi", "openapi", "grpc", "asyncapi", "graphql"];
const RESOURCE_TYPES: &[&str] = &[
    "database",
    "s3-bucket",
    "kafka-topic",
    "redis-cache",
    "queue",
];
const FIRST_NAMES: &[&str] = &[
    "ada", "alan", "grace", "linus", "margaret", "ken", "barbara", "dennis", "frances", "john",
    "radia", "tim", "donald", "edsger", "hedy", "niklaus",
];
const LAST_NAMES: &[&str] = &[
    "lovelace",
    "turing",
    "hopper",
    "torvalds",
    "hamilton",
    "thompson",
    "liskov",
    "ritchie",
    "allen",
    "backus",
    "perlman",
    "berners-lee",
    "knuth",
    "dijkstra",
    "lamarr",
    "wirth",
];
const OTHER_NAMESPACES: &[&str] = &["payments", "platform"];

/// Skeleton of one entity before its relations are known.
struct Draft {
    kind: Kind,
    name: String,
    namespace: String,
    uid: String,
    spec: Map<String, Value>,
    relations: Vec<(String, String)>,
}

impl Draft {
    fn full_ref(&self) -> String {
        format!("{}:{}/{}", self.kind.as_str(), self.namespace, self.name).to_lowercase()
    }
}

/// How many entities of each kind a catalog of `n` holds, in generation order.
fn kind_counts(n: usize) -> Vec<(Kind, usize)> {
    let order = [
        Kind::Domain,
        Kind::System,
        Kind::Group,
        Kind::User,
        Kind::Resource,
        Kind::Api,
        Kind::Component,
    ];
    if n < order.len() {
        // Too small for the mix: one of each, components first, until n runs out.
        let pref = [
            Kind::Component,
            Kind::Group,
            Kind::User,
            Kind::System,
            Kind::Api,
            Kind::Resource,
            Kind::Domain,
        ];
        return order
            .iter()
            .map(|k| (*k, usize::from(pref[..n].contains(k))))
            .collect();
    }
    let share = |percent: usize| (n * percent / 100).max(1);
    let mut counts = vec![
        (Kind::Domain, share(1)),
        (Kind::System, share(4)),
        (Kind::Group, share(5)),
        (Kind::User, share(20)),
        (Kind::Resource, share(10)),
        (Kind::Api, share(15)),
    ];
    let used: usize = counts.iter().map(|(_, c)| c).sum();
    counts.push((Kind::Component, n - used));
    counts
}

/// Generates `n` realistic Backstage entities, deterministic for `seed`: a mix
/// of Domain, System, Component, API, Resource, Group and User (at least one
/// of each when `n >= 7`) with specs, annotations, tags, links and relations
/// in both directions.
pub fn generate(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = SplitMix::new(seed);
    let mut drafts: Vec<Draft> = Vec::with_capacity(n);
    let mut by_kind: Vec<(Kind, Vec<usize>)> = Vec::new();

    for (kind, count) in kind_counts(n) {
        let mut idxs = Vec::with_capacity(count);
        for i in 0..count {
            let name = draft_name(kind, i, &mut rng);
            let namespace = if kind != Kind::User && kind != Kind::Group && rng.chance(3) {
                rng.pick(OTHER_NAMESPACES).to_string()
            } else {
                "default".to_string()
            };
            idxs.push(drafts.len());
            drafts.push(Draft {
                kind,
                name,
                namespace,
                uid: uuid(&mut rng),
                spec: Map::new(),
                relations: Vec::new(),
            });
        }
        by_kind.push((kind, idxs));
    }
    let of = |k: Kind| -> Vec<usize> {
        by_kind
            .iter()
            .find(|(kind, _)| *kind == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (domains, systems, groups, users) = (
        of(Kind::Domain),
        of(Kind::System),
        of(Kind::Group),
        of(Kind::User),
    );
    let (resources, apis, components) = (of(Kind::Resource), of(Kind::Api), of(Kind::Component));

    let mut edges: Vec<(usize, &'static str, &'static str, usize)> = Vec::new();
    let pick_from = |rng: &mut SplitMix, v: &[usize]| -> Option<usize> {
        (!v.is_empty()).then(|| v[rng.below(v.len())])
    };

    // Groups: a tree, each group a child of an earlier one.
    for (pos, &g) in groups.iter().enumerate() {
        let gtype = if pos == 0 { "organization" } else { "team" };
        drafts[g].spec.insert("type".into(), json!(gtype));
        if pos > 0 {
            let parent = groups[rng.below(pos)];
            edges.push((g, "childOf", "parentOf", parent));
        }
    }
    // Users: members of one or two groups.
    for &u in &users {
        if let Some(g) = pick_from(&mut rng, &groups) {
            edges.push((u, "memberOf", "hasMember", g));
        }
        if rng.chance(20) {
            if let Some(g) = pick_from(&mut rng, &groups) {
                // The user's first membership is the edge just pushed.
                if edges.last().map(|e| e.3) != Some(g) {
                    edges.push((u, "memberOf", "hasMember", g));
                }
            }
        }
    }
    // Ownership of everything that has an owner.
    for &e in domains
        .iter()
        .chain(&systems)
        .chain(&resources)
        .chain(&apis)
        .chain(&components)
    {
        if let Some(g) = pick_from(&mut rng, &groups) {
            edges.push((e, "ownedBy", "ownerOf", g));
        }
    }
    for &s in &systems {
        if let Some(d) = pick_from(&mut rng, &domains) {
            edges.push((s, "partOf", "hasPart", d));
        }
    }
    for &e in resources.iter().chain(&apis).chain(&components) {
        if let Some(s) = pick_from(&mut rng, &systems) {
            edges.push((e, "partOf", "hasPart", s));
        }
    }
    for &c in &components {
        for _ in 0..rng.below(3) {
            if let Some(d) = pick_from(&mut rng, &components) {
                if d != c && !edges.iter().rev().take(8).any(|x| x.0 == c && x.3 == d) {
                    edges.push((c, "dependsOn", "dependencyOf", d));
                }
            }
        }
        if rng.chance(50) {
            if let Some(r) = pick_from(&mut rng, &resources) {
                edges.push((c, "dependsOn", "dependencyOf", r));
            }
        }
        if rng.chance(60) {
            if let Some(a) = pick_from(&mut rng, &apis) {
                edges.push((c, "providesApi", "apiProvidedBy", a));
            }
        }
        for _ in 0..rng.below(3) {
            if let Some(a) = pick_from(&mut rng, &apis) {
                if !edges.iter().rev().take(8).any(|x| x.0 == c && x.3 == a) {
                    edges.push((c, "consumesApi", "apiConsumedBy", a));
                }
            }
        }
    }

    let refs: Vec<String> = drafts.iter().map(Draft::full_ref).collect();
    for &(from, forward, backward, to) in &edges {
        drafts[from]
            .relations
            .push((forward.to_string(), refs[to].clone()));
        drafts[to]
            .relations
            .push((backward.to_string(), refs[from].clone()));
        add_spec_for_edge(&mut drafts[from], forward, &refs[to]);
        add_spec_for_edge(&mut drafts[to], backward, &refs[from]);
    }

    drafts
        .into_iter()
        .map(|d| finish(d, &mut rng, seed))
        .collect()
}

fn draft_name(kind: Kind, i: usize, rng: &mut SplitMix) -> String {
    let w = rng.pick(WORDS);
    let name = match kind {
        Kind::Domain => format!("{w}-domain-{i:03}"),
        Kind::System => format!("{w}-system-{i:04}"),
        Kind::Group => format!("team-{:04}", i + 1),
        Kind::User => format!("{}.{}-{i:05}", rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES)),
        Kind::Resource => format!("{w}-{}-{i:05}", rng.pick(RESOURCE_TYPES)),
        Kind::Api => format!("{w}-api-{i:05}"),
        Kind::Component => format!("{w}-{}-{i:05}", rng.pick(SUFFIXES)),
    };
    // Backstage keeps the case authors chose; some catalogs mix it.
    if matches!(kind, Kind::Component | Kind::Api | Kind::Group) && rng.chance(10) {
        name.split('-')
            .map(|part| {
                let mut c = part.chars();
                match c.next() {
                    Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                    None => String::new(),
                }
            })
            .collect::<Vec<_>>()
            .join("-")
    } else {
        name
    }
}

/// Records the spec field a relation comes from, the way authors write it.
fn add_spec_for_edge(d: &mut Draft, relation: &str, target: &str) {
    let short = |r: &str| -> String {
        // Authors usually write refs relative to the entity's kind defaults.
        r.split_once(':')
            .map(|(_, rest)| rest)
            .unwrap_or(r)
            .trim_start_matches("default/")
            .to_string()
    };
    let push = |spec: &mut Map<String, Value>, key: &str, v: String| {
        let arr = spec.entry(key).or_insert_with(|| json!([]));
        if let Some(a) = arr.as_array_mut() {
            a.push(Value::String(v));
        }
    };
    match (d.kind, relation) {
        (_, "ownedBy") => {
            d.spec.insert("owner".into(), json!(short(target)));
        }
        (Kind::System, "partOf") => {
            d.spec.insert("domain".into(), json!(short(target)));
        }
        (_, "partOf") => {
            d.spec.insert("system".into(), json!(short(target)));
        }
        (_, "dependsOn") => push(&mut d.spec, "dependsOn", target.to_string()),
        (_, "providesApi") => push(&mut d.spec, "providesApis", short(target)),
        (_, "consumesApi") => push(&mut d.spec, "consumesApis", short(target)),
        (Kind::User, "memberOf") => push(&mut d.spec, "memberOf", short(target)),
        (Kind::Group, "childOf") => {
            d.spec.insert("parent".into(), json!(short(target)));
        }
        (Kind::Group, "parentOf") => push(&mut d.spec, "children", short(target)),
        _ => {}
    }
}

fn finish(mut d: Draft, rng: &mut SplitMix, seed: u64) -> Value {
    let word = d
        .name
        .split(['-', '.'])
        .next()
        .unwrap_or("thing")
        .to_lowercase();
    let title = d
        .name
        .split('-')
        .filter(|p| !p.chars().all(|c| c.is_ascii_digit()))
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ");
    let slug = format!("acme/{}", d.name.to_lowercase());
    let mut annotations = Map::new();
    annotations.insert(
        "backstage.io/managed-by-location".into(),
        json!(format!(
            "url:https://github.com/{slug}/blob/main/catalog-info.yaml"
        )),
    );
    annotations.insert(
        "backstage.io/managed-by-origin-location".into(),
        json!(format!(
            "url:https://github.com/{slug}/blob/main/catalog-info.yaml"
        )),
    );
    let mut labels = Map::new();
    let mut tags: Vec<&str> = Vec::new();
    let mut links: Vec<Value> = Vec::new();
    match d.kind {
        Kind::Component | Kind::Api | Kind::Resource => {
            annotations.insert("github.com/project-slug".into(), json!(slug));
            annotations.insert("backstage.io/techdocs-ref".into(), json!("dir:."));
            if rng.chance(40) {
                annotations.insert(
                    "pagerduty.com/service-id".into(),
                    json!(format!("P{:06X}", rng.next_u64() & 0xFF_FFFF)),
                );
            }
            labels.insert("tier".into(), json!(format!("{}", 1 + rng.below(3))));
            if rng.chance(50) {
                labels.insert(
                    "cost-center".into(),
                    json!(format!("cc-{:03}", rng.below(40))),
                );
            }
            for _ in 0..1 + rng.below(3) {
                let t = rng.pick(TAGS);
                if !tags.contains(&t) {
                    tags.push(t);
                }
            }
            links.push(json!({
                "url": format!("https://github.com/{slug}"),
                "title": "Repository",
                "icon": "github"
            }));
            if rng.chance(50) {
                links.push(json!({
                    "url": format!("https://grafana.example.com/d/{}", d.name.to_lowercase()),
                    "title": "Dashboard",
                    "icon": "dashboard",
                    "type": "dashboard"
                }));
            }
        }
        Kind::User => {
            let (first, last) = d.name.split_once('.').unwrap_or((&d.name, ""));
            let last = last.rsplit_once('-').map(|(l, _)| l).unwrap_or(last);
            d.spec.insert(
                "profile".into(),
                json!({
                    "displayName": format!("{} {}", capital(first), capital(last)),
                    "email": format!("{}@example.com", d.name),
                }),
            );
            d.spec.entry("memberOf").or_insert_with(|| json!([]));
        }
        Kind::Group => {
            d.spec.insert(
                "profile".into(),
                json!({ "displayName": title.clone(), "email": format!("{}@example.com", d.name.to_lowercase()) }),
            );
            d.spec.entry("children").or_insert_with(|| json!([]));
        }
        Kind::Domain | Kind::System => {}
    }
    match d.kind {
        Kind::Component => {
            d.spec
                .insert("type".into(), json!(rng.pick(COMPONENT_TYPES)));
            d.spec
                .insert("lifecycle".into(), json!(rng.pick(LIFECYCLES)));
        }
        Kind::Api => {
            let t = rng.pick(API_TYPES);
            d.spec.insert("type".into(), json!(t));
            d.spec
                .insert("lifecycle".into(), json!(rng.pick(LIFECYCLES)));
            d.spec.insert(
                "definition".into(),
                json!(format!(
                    "{t}: 3.0.0\ninfo:\n  title: {title}\n  version: 1.0.{}\npaths: {{}}\n",
                    rng.below(30)
                )),
            );
        }
        Kind::Resource => {
            let t = d.name.split('-').nth(1).unwrap_or("database").to_string();
            let t = RESOURCE_TYPES
                .iter()
                .find(|r| r.starts_with(&t))
                .copied()
                .unwrap_or("database");
            d.spec.insert("type".into(), json!(t));
        }
        _ => {}
    }
    let description = match d.kind {
        Kind::Domain => {
            format!("Everything about {word}: the business capability and its systems.")
        }
        Kind::System => {
            format!("The {word} system groups the services, APIs and data behind {word}.")
        }
        Kind::Component => {
            format!("{title} handles {word} requests for the storefront and internal tools.")
        }
        Kind::Api => format!("Public contract of {word}, versioned and reviewed by its owners."),
        Kind::Resource => format!("Storage used by the {word} services."),
        Kind::Group => format!("{title} builds and runs the software it owns."),
        Kind::User => "Engineer".to_string(),
    };

    let mut metadata = Map::new();
    metadata.insert("namespace".into(), json!(d.namespace));
    metadata.insert("annotations".into(), Value::Object(annotations));
    metadata.insert("name".into(), json!(d.name));
    metadata.insert("title".into(), json!(title));
    metadata.insert("description".into(), json!(description));
    if !labels.is_empty() {
        metadata.insert("labels".into(), Value::Object(labels));
    }
    metadata.insert("tags".into(), json!(tags));
    if !links.is_empty() {
        metadata.insert("links".into(), Value::Array(links));
    }
    metadata.insert("uid".into(), json!(d.uid));
    let relations: Vec<Value> = d
        .relations
        .iter()
        .map(|(t, r)| json!({ "type": t, "targetRef": r }))
        .collect();
    let mut entity = json!({
        "apiVersion": "backstage.io/v1alpha1",
        "kind": d.kind.as_str(),
        "metadata": Value::Object(metadata),
        "spec": Value::Object(d.spec),
        "relations": relations,
    });
    // A fresh entity's etag only needs to be unique and deterministic;
    // hashing its uid avoids serializing 100,000 entities twice.
    let etag = format!(
        "{:016x}{:016x}",
        fnv1a(d.uid.as_bytes(), seed),
        fnv1a(d.uid.as_bytes(), seed ^ 0xE7A6)
    );
    if let Some(meta) = entity.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("etag".into(), json!(etag));
    }
    entity
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn same_seed_same_entities_other_seed_differs() {
        assert_eq!(generate(300, 7), generate(300, 7));
        assert_ne!(generate(300, 7), generate(300, 8));
    }

    #[test]
    fn every_kind_present_and_counts_match() {
        for n in [7, 50, 1000] {
            let es = generate(n, 1);
            assert_eq!(es.len(), n);
            let kinds: HashSet<&str> = es.iter().filter_map(|e| e["kind"].as_str()).collect();
            assert_eq!(kinds.len(), 7, "n={n}: {kinds:?}");
        }
        assert_eq!(generate(3, 1).len(), 3);
        assert!(generate(0, 1).is_empty());
    }

    #[test]
    fn uids_and_refs_unique_and_relations_bidirectional() {
        let es = generate(2000, 3);
        let uids: HashSet<&str> = es
            .iter()
            .filter_map(|e| e["metadata"]["uid"].as_str())
            .collect();
        assert_eq!(uids.len(), es.len());
        let refs: HashSet<String> = es.iter().filter_map(entity_ref).collect();
        assert_eq!(refs.len(), es.len());
        let inverse = |t: &str| match t {
            "ownedBy" => "ownerOf",
            "ownerOf" => "ownedBy",
            "partOf" => "hasPart",
            "hasPart" => "partOf",
            "dependsOn" => "dependencyOf",
            "dependencyOf" => "dependsOn",
            "providesApi" => "apiProvidedBy",
            "apiProvidedBy" => "providesApi",
            "consumesApi" => "apiConsumedBy",
            "apiConsumedBy" => "consumesApi",
            "memberOf" => "hasMember",
            "hasMember" => "memberOf",
            "childOf" => "parentOf",
            "parentOf" => "childOf",
            other => panic!("unexpected relation {other}"),
        };
        let mut all: HashSet<(String, String, String)> = HashSet::new();
        for e in &es {
            let me = entity_ref(e).unwrap();
            for r in e["relations"].as_array().unwrap() {
                let target = r["targetRef"].as_str().unwrap().to_string();
                assert_eq!(target, target.to_lowercase());
                assert!(refs.contains(&target), "dangling {target}");
                all.insert((me.clone(), r["type"].as_str().unwrap().to_string(), target));
            }
        }
        for (from, t, to) in &all {
            assert!(all.contains(&(to.clone(), inverse(t).to_string(), from.clone())));
        }
    }

    #[test]
    fn realistic_size_and_some_mixed_case_and_namespaces() {
        let es = generate(1000, 1);
        let bytes: usize = es
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap().len())
            .sum();
        let avg = bytes / es.len();
        assert!((700..2500).contains(&avg), "average entity size {avg}");
        assert!(es.iter().any(|e| {
            let n = e["metadata"]["name"].as_str().unwrap();
            n != n.to_lowercase()
        }));
        assert!(es.iter().any(|e| e["metadata"]["namespace"] != "default"));
        for e in &es {
            let d = e["metadata"]["description"].as_str().unwrap();
            assert!(d.len() <= 200);
        }
    }
}
