//! Query attacks: queries that are cheap to send and expensive to
//! evaluate. `contains-1000` (a by-query `$any` of 1,000 `$contains`),
//! `deep-fields` (a `fields` path of tens of thousands of parts) and
//! `order-3500` (`GET /entities` ordered by 3,500 new fields per request).
//!
//! Called by `abuse::exercise`. The first two check that every answer comes
//! within `proxy.query_budget` (plus [`ANSWER_MARGIN`]), as 200, 400 or 503
//! (a query stopped by the budget, or no query thread free within it); the
//! third that the sort columns it makes stay within
//! `proxy.sort_columns_max_bytes` (its RSS ceiling).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use super::{Attack, Attacked, Field, Tally, ANSWER_MARGIN};
use crate::scenario::{client_error, raw_request, size_text, HarnessError, Lab};

/// Attack 1.
pub(crate) const CONTAINS: Attack = Attack {
    name: "contains-1000",
    about: "POST /entities/by-query with {\"query\": {\"$any\": [1,000 × {\"metadata.tags\": {\"$contains\": \"tag-NNNN\"}}]}} and, in turn, with 1,000 × {\"metadata.links\": {\"$contains\": {\"title\": \"Repository\", \"icon\": \"dashboard\"}}} (a near miss no index can rule out), 2 at once, repeated for the attack's duration",
    checks: "every answer within proxy.query_budget + 1s margin, as 200, 400 or 503",
};

/// Attack 2.
pub(crate) const DEEP_FIELDS: Attack = Attack {
    name: "deep-fields",
    about: "GET /entities/by-query?limit=ALL&fields=a.a.a… (as many parts as a 65,534-byte request target holds, sent raw) and POST /entities/by-query with \"fields\": [a path of 65,536 parts, 128 KiB] and the same limit, 3 at once, repeated",
    checks: "every answer within proxy.query_budget + 1s margin, as 200, 400 or 503",
};

/// Attack 3.
pub(crate) const ORDER_FLOOD: Attack = Attack {
    name: "order-3500",
    about: "6 orderings GET /entities?limit=1&order=asc:spec.F1&…, each by 3,500 fields no other ordering used (all on one entity added upstream and synced first), each split into 2 requests, one after another",
    checks: "RSS under RSS before + proxy.sort_columns_max_bytes + margin; every answer within proxy.query_budget + 1s margin, as 200, 400 or 503",
};

/// hyper's limit on a request target (`MAX_URI_LEN`): longer ones are 414.
const MAX_TARGET: usize = 65_534;

/// One query request, replayable.
#[derive(Debug, Clone)]
enum Query {
    /// A GET of this URL.
    Get(String),
    /// A POST of this URL with this JSON body.
    Post(String, Bytes),
    /// A GET of this request target sent as raw bytes to this address
    /// (HTTP client libraries refuse a URI of 64 KiB).
    RawGet(String, String),
}

impl Query {
    /// The request target and body, in bytes.
    fn size(&self) -> usize {
        match self {
            Query::Get(url) => url.len(),
            Query::Post(url, body) => url.len() + body.len(),
            Query::RawGet(_, target) => target.len(),
        }
    }

    fn method(&self) -> &'static str {
        match self {
            Query::Post(..) => "POST",
            _ => "GET",
        }
    }
}

/// Sends `queries` (round robin) from `workers` loops until `for_` has
/// passed, each answer judged against the query budget.
async fn repeat(x: &Field<'_>, queries: Vec<Query>, workers: usize, for_: Duration) -> Tally {
    let budget = x.limits.query_budget;
    let limit = budget + ANSWER_MARGIN;
    let queries = Arc::new(queries);
    let until = Instant::now() + for_;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let queries = queries.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut tally = Tally::default();
                let mut n = w;
                while Instant::now() < until {
                    let q = &queries[n % queries.len()];
                    n += workers;
                    let (status, took, bad) = send_query(&http, q, budget, limit).await;
                    tally.add(status, took, bad);
                }
                tally
            })
        })
        .collect();
    merge(handles).await
}

/// Sends one query; an answer that is not 200/400/503 within `limit` is bad.
async fn send_query(
    http: &reqwest::Client,
    q: &Query,
    budget: Duration,
    limit: Duration,
) -> (u16, Duration, Option<String>) {
    let message_of = |body: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let started = Instant::now();
    let (status, message) = match q {
        Query::RawGet(addr, target) => {
            let request =
                format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            match raw_request(addr, request.as_bytes(), limit).await {
                Ok(answer) => (answer.status, message_of(&answer.body)),
                Err(e) => (0, e),
            }
        }
        Query::Get(_) | Query::Post(..) => {
            let request = match q {
                Query::Post(url, body) => http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.clone()),
                Query::Get(url) | Query::RawGet(url, _) => http.get(url),
            };
            match request.timeout(limit).send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp.bytes().await.unwrap_or_default();
                    (status, message_of(&body))
                }
                Err(e) => (0, client_error(e)),
            }
        }
    };
    let took = started.elapsed();
    let what = q.method();
    let bad = if status == 0 {
        Some(format!(
            "a {what} query got no answer within proxy.query_budget {}ms + margin {}ms ({message})",
            budget.as_millis(),
            ANSWER_MARGIN.as_millis()
        ))
    } else if took > limit {
        Some(format!(
            "a {what} query was answered {status} after {}ms, over proxy.query_budget {}ms + margin {}ms",
            took.as_millis(),
            budget.as_millis(),
            ANSWER_MARGIN.as_millis()
        ))
    } else if ![200, 400, 503].contains(&status) {
        Some(format!(
            "a {what} query was answered {status}: {}",
            message.chars().take(200).collect::<String>()
        ))
    } else {
        None
    };
    (status, took, bad)
}

async fn merge(handles: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut all = Tally::default();
    for h in handles {
        if let Ok(t) = h.await {
            for (s, n) in t.by_status {
                *all.by_status.entry(s).or_default() += n;
            }
            all.slowest = all.slowest.max(t.slowest);
            all.bad += t.bad;
            if all.first_bad.is_none() {
                all.first_bad = t.first_bad;
            }
        }
    }
    all
}

/// Turns a tally into the attack's report lines.
fn report(tally: &Tally, attacked: &mut Attacked) {
    attacked.requests = tally.count();
    attacked
        .notes
        .push(format!("answers: {}", tally.describe()));
    if let Some(first) = &tally.first_bad {
        attacked.fail(format!(
            "{} of {} answers broke the query budget; first: {first}",
            tally.bad,
            tally.count()
        ));
    }
}

/// `$contains` terms of each `contains-1000` query.
const TERMS: usize = 1000;

/// Attack 1: `contains-1000`.
pub(crate) async fn contains(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    // As asked: tags no entity has. A sidecar that narrows `$contains`
    // with its index rules these out at once, so a second query keeps the
    // budget to the test: each term is a near miss, an element with a
    // title and an icon that the catalog's links have, but never in the
    // same link, so every candidate's body must be read, term after term.
    let tags: Vec<_> = (0..TERMS)
        .map(|i| json!({"metadata.tags": {"$contains": format!("tag-{i:04}")}}))
        .collect();
    let near_misses: Vec<_> = (0..TERMS)
        .map(|_| json!({"metadata.links": {"$contains": {"title": "Repository", "icon": "dashboard"}}}))
        .collect();
    let url = format!("{}/entities/by-query", x.lab.sidecar.catalog_url());
    let bodies: Vec<Bytes> = [tags, near_misses]
        .into_iter()
        .map(|terms| Bytes::from(json!({"query": {"$any": terms}}).to_string()))
        .collect();
    let sizes: Vec<usize> = bodies.iter().map(Bytes::len).collect();
    let largest = sizes.iter().copied().max().unwrap_or(0) as u64;
    let workers = 2;
    let queries = bodies
        .into_iter()
        .map(|b| Query::Post(url.clone(), b))
        .collect();
    let tally = repeat(x, queries, workers, x.sizes.attack_for).await;
    let mut attacked = Attacked::default();
    report(&tally, &mut attacked);
    attacked.notes.push(format!(
        "two queries in turn, each an $any of {TERMS} $contains: metadata.tags tag-NNNN ({} bytes), and metadata.links {{title: Repository, icon: dashboard}}, a near miss ({} bytes)",
        sizes[0], sizes[1]
    ));
    attacked.ceiling = Some(x.ceiling(
        workers as u64 * 16 * largest,
        &format!(
            "{workers} queries in flight × 16 × the larger request {} (body, parsed JSON tree and predicate)",
            size_text(largest)
        ),
    ));
    Ok(attacked)
}

/// A dotted path of `parts` parts: `a.a.a…`.
fn dotted(parts: usize) -> String {
    let mut s = String::with_capacity(parts * 2);
    for i in 0..parts {
        if i > 0 {
            s.push('.');
        }
        s.push('a');
    }
    s
}

/// Attack 2: `deep-fields`.
pub(crate) async fn deep_fields(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let base = x.lab.sidecar.catalog_url();
    // One page of the whole catalog: the path is resolved on every entity.
    let limit = x.lab.entities;
    let target_prefix = format!("/api/catalog/entities/by-query?limit={limit}&fields=");
    // `a` and `.a` per part: the longest path whose target fits.
    let get_parts = (MAX_TARGET - target_prefix.len()).div_ceil(2);
    let get = Query::RawGet(x.proxy(), format!("{target_prefix}{}", dotted(get_parts)));
    let post_parts = 65_536;
    let post_body =
        Bytes::from(json!({"fields": [dotted(post_parts)], "limit": limit}).to_string());
    let post = Query::Post(format!("{base}/entities/by-query"), post_body);
    let largest = get.size().max(post.size()) as u64;
    let workers = 3;
    let notes = format!(
        "GET fields path of {get_parts} parts ({} bytes of request target, sent raw; hyper's limit is {MAX_TARGET}); POST fields path of {post_parts} parts ({} bytes of body); both one page of all {limit} entities",
        get.size(),
        post.size()
    );
    let tally = repeat(x, vec![get, post], workers, x.sizes.attack_for).await;
    let mut attacked = Attacked::default();
    report(&tally, &mut attacked);
    attacked.notes.push(notes);
    attacked.ceiling = Some(x.ceiling(
        workers as u64 * 16 * largest,
        &format!(
            "{workers} queries in flight × 16 × the largest request {} (URL or body, parsed, the path split into parts)",
            size_text(largest)
        ),
    ));
    Ok(attacked)
}

/// Field names per ordering of `order-3500`.
const ORDER_FIELDS: usize = 3500;
/// Orderings of `order-3500`.
const ORDERINGS: usize = 6;
/// Requests each ordering is split into: 3,500 `order=asc:spec.oNNNNN`
/// take 77 KB of query string, over the sidecar's 64 KiB.
const SPLIT: usize = 2;
/// The entity that has every field ordered by.
const SORT_ENTITY: &str = "abuse-sort-fields";

/// The field (below `spec`) of ordering `r`, number `i`.
fn sort_field(r: usize, i: usize) -> String {
    format!("o{r}{i:04}")
}

/// Before `order-3500`: gives the demo catalog one entity with all 21,000
/// fields (a field no entity has needs no sort column, so fields that do
/// not exist would prove nothing), and syncs it into the mirror.
pub(crate) async fn prepare_order(lab: &mut Lab) -> Result<String, HarnessError> {
    let mut spec = serde_json::Map::new();
    spec.insert("type".into(), json!("service"));
    spec.insert("lifecycle".into(), json!("experimental"));
    spec.insert("owner".into(), json!("group:default/abuse"));
    for r in 0..ORDERINGS {
        for i in 0..ORDER_FIELDS {
            spec.insert(sort_field(r, i), json!("x"));
        }
    }
    let entity = json!({
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": SORT_ENTITY, "namespace": "default"},
        "spec": spec
    });
    let size = entity.to_string().len() as u64;
    lab.upstream.add_entities(vec![entity]).await?;
    let code = lab
        .sidecar
        .admin(reqwest::Method::POST, "/admin/sync", json!({}))
        .await?;
    if code != 200 {
        return Err(HarnessError::Http(format!(
            "POST /admin/sync answered {code} after adding {SORT_ENTITY}"
        )));
    }
    lab.entities += 1;
    lab.sidecar
        .wait_ready(lab.entities, Duration::from_secs(30))
        .await?;
    Ok(format!(
        "before the attack: component:default/{SORT_ENTITY} ({}) with {} fields spec.oRNNNN added upstream and synced",
        size_text(size),
        ORDERINGS * ORDER_FIELDS
    ))
}

/// Attack 3: `order-3500`.
pub(crate) async fn order_flood(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let base = x.lab.sidecar.catalog_url();
    let budget = x.limits.query_budget;
    let limit = budget + ANSWER_MARGIN;
    let http = reqwest::Client::new();
    let mut tally = Tally::default();
    let mut longest = 0;
    let per_request = ORDER_FIELDS.div_ceil(SPLIT);
    for r in 0..ORDERINGS {
        for part in 0..SPLIT {
            let order: Vec<String> = (part * per_request
                ..((part + 1) * per_request).min(ORDER_FIELDS))
                .map(|i| format!("order=asc:spec.{}", sort_field(r, i)))
                .collect();
            let url = format!("{base}/entities?limit=1&{}", order.join("&"));
            longest = longest.max(url.len() - "http://".len() - x.proxy().len());
            let (status, took, bad) = send_query(&http, &Query::Get(url), budget, limit).await;
            tally.add(status, took, bad);
        }
    }
    let mut attacked = Attacked::default();
    report(&tally, &mut attacked);
    let unbounded = (ORDERINGS * ORDER_FIELDS * x.lab.entities * 4) as u64;
    attacked.notes.push(format!(
        "{ORDERINGS} orderings × {ORDER_FIELDS} fields, each split into {SPLIT} requests (request targets of at most {longest} bytes; the sidecar takes at most 64 KiB of query string); kept unbounded, their sort columns would take at least {} ({} entities × 4 bytes of rank each)",
        size_text(unbounded),
        x.lab.entities
    ));
    attacked.ceiling = Some(x.ceiling(
        x.limits.sort_columns_max_bytes,
        &format!(
            "proxy.sort_columns_max_bytes {}",
            size_text(x.limits.sort_columns_max_bytes)
        ),
    ));
    Ok(attacked)
}
