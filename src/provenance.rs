//! What an upstream answer says about its own freshness, when the upstream
//! is itself a cache (another catalog-cache, or any HTTP cache): its `Age`,
//! whether it marked the data stale (`X-Catalog-Stale: true`), and its
//! `Cache-Status` members. From these the sidecar keeps the time the
//! *origin* catalog last confirmed the data — received minus the upstream's
//! `Age` — so staleness survives every hop instead of being laundered into
//! fresh data by each tier. A Backstage upstream sends none of these: its
//! answers are the origin's, confirmed when received.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// The header a client checks to know whether it got stale data.
pub const STALE_HEADER: http::HeaderName = http::HeaderName::from_static("x-catalog-stale");
/// RFC 9211's header.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// Longest `Cache-Status` kept from an upstream (a long chain of tiers is
/// cut, not trusted to be small).
pub const MAX_CACHE_STATUS: usize = 1024;

/// An upstream answer's own account of its freshness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    /// How long ago the origin confirmed the data, as the upstream says
    /// (`Age`, RFC 9111); zero when it says nothing.
    pub age: Duration,
    /// The upstream marked the data stale.
    pub stale: bool,
    /// The upstream's `Cache-Status` members, as sent.
    pub cache_status: Option<Arc<str>>,
}

impl Provenance {
    /// Reads an upstream answer's headers. Malformed values count as absent
    /// (an `Age` that is not a number of seconds says nothing).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &http::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let age = text(&http::header::AGE)
            .and_then(|v| v.parse::<u64>().ok())
            // More than a year is not an age a catalog answer has.
            .map(|s| Duration::from_secs(s.min(365 * 24 * 3600)))
            .unwrap_or_default();
        let stale = text(&STALE_HEADER).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let cache_status = text(&CACHE_STATUS).filter(|v| !v.is_empty()).map(|v| {
            let cut = if v.len() > MAX_CACHE_STATUS {
                let mut end = MAX_CACHE_STATUS;
                while !v.is_char_boundary(end) {
                    end -= 1;
                }
                &v[..end]
            } else {
                v
            };
            Arc::from(cut)
        });
        Self {
            age,
            stale,
            cache_status,
        }
    }

    /// When the origin confirmed the data, for an answer received at
    /// `received`.
    pub fn origin_confirmed(&self, received: SystemTime) -> SystemTime {
        received.checked_sub(self.age).unwrap_or(received)
    }

    /// Whether the upstream is itself a cache that said anything at all.
    pub fn is_tiered(&self) -> bool {
        self.cache_status.is_some() || self.stale || !self.age.is_zero()
    }
}

/// When and how the data was last confirmed, as far as this sidecar knows:
/// the origin-confirmed time, when this sidecar last heard from its
/// upstream, whether the upstream said the data was stale, and the
/// upstream's `Cache-Status` members. For a Backstage upstream the first two
/// are the same moment, the third is false and the fourth absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    /// When the origin catalog last confirmed the data (received minus the
    /// upstream's `Age`).
    pub origin_at: SystemTime,
    /// When this sidecar last heard from its upstream about it.
    pub checked_at: SystemTime,
    /// The upstream said the data was stale.
    pub upstream_stale: bool,
    /// The upstream's `Cache-Status` members, as last received.
    pub via: Option<Arc<str>>,
    /// A write passed through this sidecar since, naming this data (see
    /// `writes`): it is not fresh whatever its age. Held in memory only.
    pub written_since: bool,
}

impl Confirmation {
    /// An answer with this provenance, received at `received`.
    pub fn received(provenance: &Provenance, received: SystemTime) -> Self {
        Self {
            origin_at: provenance.origin_confirmed(received),
            checked_at: received,
            upstream_stale: provenance.stale,
            via: provenance.cache_status.clone(),
            written_since: false,
        }
    }

    /// Whether the data may be served as fresh (by its age alone it may
    /// still be too old: see the read path's decision).
    pub fn trusted(&self) -> bool {
        !self.upstream_stale && !self.written_since
    }

    /// Folds in another answer of the same walk: the data is as old as its
    /// oldest part and stale if any part was.
    pub fn merge(&mut self, other: Confirmation) {
        self.origin_at = self.origin_at.min(other.origin_at);
        self.checked_at = self.checked_at.max(other.checked_at);
        self.upstream_stale |= other.upstream_stale;
        self.written_since |= other.written_since;
        if other.via.is_some() {
            self.via = other.via;
        }
    }
}

/// A direct confirmation by the origin at that moment (a Backstage
/// upstream, a snapshot's recorded time).
impl From<SystemTime> for Confirmation {
    fn from(at: SystemTime) -> Self {
        Self {
            origin_at: at,
            checked_at: at,
            upstream_stale: false,
            via: None,
            written_since: false,
        }
    }
}

/// `Cache-Status` for an answer: the upstream's members first, then ours
/// (RFC 9211 lists caches from the origin outward).
pub fn cache_status(upstream: Option<&str>, ours: &str) -> String {
    match upstream {
        Some(u) => format!("{u}, {ours}"),
        None => ours.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_s_headers_are_read_and_its_age_is_subtracted() {
        let mut h = HeaderMap::new();
        h.insert(http::header::AGE, "9".parse().unwrap());
        h.insert(STALE_HEADER, "true".parse().unwrap());
        h.insert(CACHE_STATUS, "tier-a; hit; ttl=-7".parse().unwrap());
        let p = Provenance::from_headers(&h);
        assert_eq!(p.age, Duration::from_secs(9));
        assert!(p.stale);
        assert_eq!(p.cache_status.as_deref(), Some("tier-a; hit; ttl=-7"));
        let now = SystemTime::now();
        assert_eq!(p.origin_confirmed(now), now - Duration::from_secs(9));
        assert_eq!(
            cache_status(p.cache_status.as_deref(), "tier-b; hit"),
            "tier-a; hit; ttl=-7, tier-b; hit"
        );
        assert!(p.is_tiered());
    }

    #[test]
    fn a_plain_backstage_answer_says_nothing_and_junk_is_ignored() {
        let p = Provenance::from_headers(&HeaderMap::new());
        assert_eq!(p, Provenance::default());
        assert!(!p.is_tiered());
        let mut h = HeaderMap::new();
        h.insert(http::header::AGE, "soon".parse().unwrap());
        h.insert(STALE_HEADER, "maybe".parse().unwrap());
        h.insert(CACHE_STATUS, "x".repeat(5000).parse().unwrap());
        let p = Provenance::from_headers(&h);
        assert_eq!(p.age, Duration::ZERO);
        assert!(!p.stale);
        assert_eq!(
            p.cache_status.as_deref().map(str::len),
            Some(MAX_CACHE_STATUS)
        );
        let now = SystemTime::now();
        assert_eq!(p.origin_confirmed(now), now);
    }
}
