//! The operator's flags: the breaker mode override and the stale-data flag.
//!
//! A flag set at run time (CLI, admin API, status page) is persisted in the
//! mirror database with who set it, why and until when, and wins over the
//! config file until it is set back or expires. Every change writes an audit
//! entry in the same transaction. The breaker's mode is set here and only
//! here (`set_mode`, `expire`, and at load), so the stored flag and the
//! breaker cannot disagree. The read path and readiness ask this module,
//! and only this module, what the stale policy is. Time is the sidecar's
//! [`Clock`], so an override's expiry is tested by moving it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::breaker::{Breaker, BreakerMode};
use crate::clock::Clock;
use crate::config::{Config, StalePolicy};
use crate::mirror::{AuditRecord, Mirror, MirrorError, StoredFlag};

const BREAKER_FLAG: &str = "breaker_mode";
const STALE_FLAG: &str = "stale_policy";
const MAX_STALE_FLAG: &str = "max_stale";

/// The longest a breaker override may be set for: longer is a config
/// change, not an incident decision.
pub const MAX_OVERRIDE_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// The largest `max_stale` an operator may set.
pub const MAX_MAX_STALE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest reason kept in the audit trail, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// Why an operator's change was refused.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    /// A value outside what may be set; the message names the limit.
    #[error("{0}")]
    OutOfRange(String),
    /// The mirror could not persist it.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
}

/// A limit of whole days as people write it (`7 days`).
fn days(d: Duration) -> String {
    format!("{} days", d.as_secs() / 86_400)
}

fn check_reason(reason: Option<&str>) -> Result<(), FlagError> {
    match reason {
        Some(r) if r.chars().count() > MAX_REASON_CHARS => Err(FlagError::OutOfRange(format!(
            "'reason' is {} characters long; at most {MAX_REASON_CHARS} are kept",
            r.chars().count()
        ))),
        _ => Ok(()),
    }
}

/// The breaker mode in force and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModeSetting {
    /// The mode.
    pub mode: BreakerMode,
    /// Why (the operator's reason), if set at run time.
    pub reason: Option<String>,
    /// Who set it (`config` when it is the file's).
    pub actor: String,
    /// When it returns to `auto` by itself.
    #[serde(skip)]
    pub expires_at: Option<SystemTime>,
}

/// The stale policy in force.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StaleSetting {
    /// `serve` or `refuse`.
    pub policy: StalePolicy,
    /// The oldest data ever served.
    #[serde(skip)]
    pub max_stale: Duration,
    /// Who set it.
    pub actor: String,
    /// Why.
    pub reason: Option<String>,
}

#[derive(Debug, Clone)]
struct Current {
    mode: ModeSetting,
    stale: StaleSetting,
}

/// The flags, cached in memory and persisted in the mirror.
pub struct Flags {
    configured_mode: BreakerMode,
    configured_policy: StalePolicy,
    configured_max_stale: Duration,
    current: Mutex<Current>,
    mirror: Arc<Mirror>,
    breaker: Breaker,
    clock: Clock,
}

impl Flags {
    /// Loads the persisted flags over the configured ones and puts the
    /// breaker in the mode in force.
    pub fn load(
        config: &Config,
        mirror: Arc<Mirror>,
        breaker: Breaker,
        clock: Clock,
    ) -> Result<Self, MirrorError> {
        let configured_mode = config.breaker.mode;
        let configured_policy = config.stale.policy;
        let configured_max_stale = config.stale.max_stale.get();
        let mut mode = ModeSetting {
            mode: configured_mode,
            reason: None,
            actor: "config".into(),
            expires_at: None,
        };
        let now = clock.now();
        if let Some(flag) = mirror.flag(BREAKER_FLAG)? {
            match flag.value.parse::<BreakerMode>() {
                Ok(m) => {
                    // An expiry further off than any operator may set (a
                    // file written by hand, or by a version without the
                    // limit) is pulled in, and said so, rather than trusted.
                    let latest = now + MAX_OVERRIDE_FOR;
                    let expires_at = match flag.expires_at {
                        Some(t) if t > latest => {
                            tracing::warn!(
                                "the stored breaker override expired too far in the future; it now expires in {}",
                                days(MAX_OVERRIDE_FOR)
                            );
                            let repaired = StoredFlag {
                                expires_at: Some(latest),
                                ..flag.clone()
                            };
                            mirror.set_flag(
                                BREAKER_FLAG,
                                Some(&repaired),
                                &AuditRecord {
                                    at: now,
                                    actor: "repair",
                                    subject: "breaker_mode",
                                    from: Some(&flag.value),
                                    to: &flag.value,
                                    reason: Some("stored expiry beyond the longest override allowed; shortened"),
                                },
                            )?;
                            Some(latest)
                        }
                        other => other,
                    };
                    mode = ModeSetting {
                        mode: m,
                        reason: flag.reason,
                        actor: flag.actor,
                        expires_at,
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the stored breaker override is unreadable; dropping it");
                    mirror.set_flag(
                        BREAKER_FLAG,
                        None,
                        &AuditRecord {
                            at: now,
                            actor: "repair",
                            subject: "breaker_mode",
                            from: Some(&flag.value),
                            to: configured_mode.as_str(),
                            reason: Some("stored value unreadable; back to the configured mode"),
                        },
                    )?;
                }
            }
        }
        let mut stale = StaleSetting {
            policy: configured_policy,
            max_stale: configured_max_stale,
            actor: "config".into(),
            reason: None,
        };
        if let Some(flag) = mirror.flag(STALE_FLAG)? {
            if let Ok(p) = flag.value.parse::<StalePolicy>() {
                stale.policy = p;
                stale.actor = flag.actor;
                stale.reason = flag.reason;
            }
        }
        if let Some(flag) = mirror.flag(MAX_STALE_FLAG)? {
            match humantime::parse_duration(&flag.value) {
                Ok(d) if !d.is_zero() && d <= MAX_MAX_STALE => stale.max_stale = d,
                _ => {
                    tracing::warn!(value = %flag.value, "the stored max_stale is unreadable or out of range; using the configured one");
                    let configured = humantime::format_duration(configured_max_stale).to_string();
                    mirror.set_flag(
                        MAX_STALE_FLAG,
                        None,
                        &AuditRecord {
                            at: now,
                            actor: "repair",
                            subject: "max_stale",
                            from: Some(&flag.value),
                            to: &configured,
                            reason: Some("stored value unreadable or out of range; back to the configured one"),
                        },
                    )?;
                }
            }
        }
        breaker.set_mode(mode.mode);
        Ok(Self {
            configured_mode,
            configured_policy,
            configured_max_stale,
            current: Mutex::new(Current { mode, stale }),
            mirror,
            breaker,
            clock,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The breaker mode in force (an expired override counts as gone; call
    /// [`Flags::expire`] to persist and audit the return).
    pub fn mode(&self) -> ModeSetting {
        self.lock().mode.clone()
    }

    /// The stale policy in force.
    pub fn stale(&self) -> StaleSetting {
        self.lock().stale.clone()
    }

    /// The stale policy and `max_stale` in force, without the who and why
    /// (what every read that cannot be answered fresh asks).
    pub fn stale_rule(&self) -> (StalePolicy, Duration) {
        let current = self.lock();
        (current.stale.policy, current.stale.max_stale)
    }

    /// Sets the breaker mode, optionally for a limited time: persisted,
    /// audited, then in force in the breaker. Returns the new setting.
    /// Blocking (a SQLite write).
    pub fn set_mode(
        &self,
        mode: BreakerMode,
        reason: Option<&str>,
        for_: Option<Duration>,
        actor: &str,
    ) -> Result<ModeSetting, FlagError> {
        check_reason(reason)?;
        if let Some(d) = for_ {
            if d.is_zero() || d > MAX_OVERRIDE_FOR {
                return Err(FlagError::OutOfRange(format!(
                    "'for' must be longer than 0s and at most {} (got {})",
                    days(MAX_OVERRIDE_FOR),
                    humantime::format_duration(d)
                )));
            }
        }
        let mut current = self.lock();
        let now = self.clock.now();
        let setting = ModeSetting {
            mode,
            reason: reason.map(str::to_string),
            actor: actor.to_string(),
            expires_at: for_.map(|d| now + d),
        };
        let stored = StoredFlag {
            value: mode.as_str().to_string(),
            reason: setting.reason.clone(),
            actor: actor.to_string(),
            set_at: now,
            expires_at: setting.expires_at,
        };
        let reason_text = match for_ {
            Some(d) => Some(format!(
                "{} (for {})",
                reason.unwrap_or("no reason given"),
                humantime::format_duration(d)
            )),
            None => reason.map(str::to_string),
        };
        // Setting the configured mode with no time limit clears the override.
        let persisted = (mode != self.configured_mode || for_.is_some()).then_some(&stored);
        self.mirror.set_flag(
            BREAKER_FLAG,
            persisted,
            &AuditRecord {
                at: now,
                actor,
                subject: "breaker_mode",
                from: Some(current.mode.mode.as_str()),
                to: mode.as_str(),
                reason: reason_text.as_deref(),
            },
        )?;
        let from = std::mem::replace(&mut current.mode, setting.clone()).mode;
        self.breaker.set_mode(mode);
        tracing::warn!(
            from = from.as_str(),
            to = mode.as_str(),
            actor,
            reason = reason.unwrap_or(""),
            "breaker mode changed"
        );
        Ok(setting)
    }

    /// Returns an expired breaker override to the configured mode
    /// (persisted, audited, in force). Returns the new mode when something
    /// expired. Blocking (a SQLite write when something expired).
    pub fn expire(&self) -> Result<Option<BreakerMode>, MirrorError> {
        let now = self.clock.now();
        let expired = {
            let current = self.lock();
            matches!(current.mode.expires_at, Some(t) if t <= now)
        };
        if !expired {
            return Ok(None);
        }
        let mode = self.configured_mode;
        let mut current = self.lock();
        let from = current.mode.mode;
        self.mirror.set_flag(
            BREAKER_FLAG,
            None,
            &AuditRecord {
                at: now,
                actor: "expiry",
                subject: "breaker_mode",
                from: Some(from.as_str()),
                to: mode.as_str(),
                reason: Some("the operator's time limit ran out"),
            },
        )?;
        current.mode = ModeSetting {
            mode,
            reason: None,
            actor: "config".into(),
            expires_at: None,
        };
        self.breaker.set_mode(mode);
        tracing::warn!(
            from = from.as_str(),
            to = mode.as_str(),
            "breaker override expired"
        );
        Ok(Some(mode))
    }

    /// Sets the stale policy and, optionally, the oldest data ever served:
    /// persisted and audited, then in force for every read that begins
    /// after this returns. Blocking (a SQLite write).
    pub fn set_stale(
        &self,
        policy: StalePolicy,
        max_stale: Option<Duration>,
        reason: Option<&str>,
        actor: &str,
    ) -> Result<StaleSetting, FlagError> {
        check_reason(reason)?;
        if let Some(d) = max_stale {
            if d < Duration::from_secs(1) || d > MAX_MAX_STALE {
                return Err(FlagError::OutOfRange(format!(
                    "'max_stale' must be from 1s to {} (got {})",
                    days(MAX_MAX_STALE),
                    humantime::format_duration(d)
                )));
            }
        }
        let mut current = self.lock();
        let now = self.clock.now();
        let from = current.stale.clone();
        let stored = StoredFlag {
            value: policy.as_str().to_string(),
            reason: reason.map(str::to_string),
            actor: actor.to_string(),
            set_at: now,
            expires_at: None,
        };
        let persisted = (policy != self.configured_policy).then_some(&stored);
        self.mirror.set_flag(
            STALE_FLAG,
            persisted,
            &AuditRecord {
                at: now,
                actor,
                subject: "stale_policy",
                from: Some(from.policy.as_str()),
                to: policy.as_str(),
                reason,
            },
        )?;
        let mut max = from.max_stale;
        if let Some(d) = max_stale {
            let text = humantime::format_duration(d).to_string();
            let stored = StoredFlag {
                value: text.clone(),
                ..stored.clone()
            };
            let persisted = (d != self.configured_max_stale).then_some(&stored);
            let from_text = humantime::format_duration(from.max_stale).to_string();
            self.mirror.set_flag(
                MAX_STALE_FLAG,
                persisted,
                &AuditRecord {
                    at: now,
                    actor,
                    subject: "max_stale",
                    from: Some(&from_text),
                    to: &text,
                    reason,
                },
            )?;
            max = d;
        }
        current.stale = StaleSetting {
            policy,
            max_stale: max,
            actor: actor.to_string(),
            reason: reason.map(str::to_string),
        };
        tracing::warn!(
            from = from.policy.as_str(),
            to = policy.as_str(),
            max_stale = %humantime::format_duration(max),
            actor,
            "stale policy changed"
        );
        Ok(current.stale.clone())
    }
}
