//! A userspace network fault proxy: a TCP proxy on loopback between the
//! sidecar and the demo catalog that makes the network faults this kernel
//! cannot make (no netem qdisc): latency with jitter, a bandwidth limit,
//! connection resets in the middle of an answer's body, half-open
//! connections, random stalls that emulate packet loss, and a full
//! partition.
//!
//! The fault set can be changed at any moment through the [`FaultProxy`]
//! handle (the scenarios do) or given once to `catalog-chaos fault-proxy`.
//! Every fault acts per connection and per chunk (a read from a socket, up
//! to 16 KiB, cut into 1,460-byte segments where a fault counts segments),
//! and each connection draws its random choices from an RNG seeded with
//! the proxy's seed, its connection number and the direction, so a run is
//! replayed with the same seed.
//!
//! Each direction of a connection is a pipeline: a reader stamps each
//! chunk with its arrival and a writer delivers it when the faults allow,
//! in order, so latency does not add up with the amount of data (as on a
//! long link) and a stall holds back what follows it (as a lost segment
//! does in TCP).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes read from a socket at most at once: one chunk.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// The segment the bandwidth limit and the loss stalls count in: an
/// Ethernet MSS.
pub const SEGMENT_BYTES: usize = 1460;
/// Retransmissions of one lost segment at most (each may be lost again);
/// the longest stall is `rto × (2^MAX_RETRIES − 1)`.
pub const MAX_RETRIES: u32 = 4;

/// Latency added to every chunk, in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// The one-way delay, in milliseconds.
    pub ms: u64,
    /// Each chunk's delay is `ms` ± up to this much (uniform), in
    /// milliseconds; chunks still arrive in order.
    #[serde(default)]
    pub jitter_ms: u64,
}

/// Resets each connection in the middle of an answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetMidBody {
    /// The fewest body bytes passed on before the reset.
    pub min_bytes: u64,
    /// The most body bytes passed on before the reset (drawn uniformly per
    /// connection between the two).
    pub max_bytes: u64,
}

/// Random stalls that emulate packet loss: each segment is lost with
/// `probability`, and a lost segment arrives after a retransmission
/// timeout, doubled for each time it is lost again (as TCP does).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Loss {
    /// Chance that a segment is lost, 0 to 1.
    pub probability: f64,
    /// The first retransmission timeout, in milliseconds (Linux's floor is
    /// 200).
    pub rto_ms: u64,
}

/// The faults the proxy applies; every field left out is off. The same
/// JSON is accepted by `catalog-chaos fault-proxy --faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetFaults {
    /// Latency with jitter, each direction.
    pub latency: Option<Latency>,
    /// A bandwidth limit in bytes per second, each direction, shared by
    /// every connection (one link).
    pub bandwidth: Option<u64>,
    /// Connections reset in the middle of an answer's body.
    pub reset_mid_body: Option<ResetMidBody>,
    /// Connections accepted while it holds are never connected upstream
    /// and never answered; established ones go silent too (the peer hangs)
    /// and stay so after the fault clears. Their bytes are read and dropped.
    pub half_open: bool,
    /// Random stalls that emulate packet loss.
    pub loss: Option<Loss>,
    /// Nothing crosses in either direction, on any connection, and new
    /// connections are not connected upstream; what was held is delivered
    /// once it clears (as TCP's retransmissions would).
    pub partition: bool,
}

impl NetFaults {
    /// Whether no fault is set.
    pub fn is_clear(&self) -> bool {
        *self == NetFaults::default()
    }
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections reset mid-body.
    pub resets: u64,
    /// Connections that went (or were accepted) silent by `half_open`.
    pub silenced: u64,
    /// Segments stalled by `loss`.
    pub stalls: u64,
    /// Chunks held back by `partition`.
    pub held: u64,
    /// Bytes passed from the client to the upstream.
    pub bytes_up: u64,
    /// Bytes passed from the upstream to the client.
    pub bytes_down: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    resets: AtomicU64,
    silenced: AtomicU64,
    stalls: AtomicU64,
    held: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// One direction of the link, for the bandwidth limit: when it is free to
/// send the next segment.
struct Link {
    next_free: Mutex<Option<Instant>>,
}

impl Link {
    /// Books `bytes` on the link at `rate` bytes per second and returns
    /// when they have been sent.
    fn book(&self, bytes: usize, rate: u64) -> Instant {
        let now = Instant::now();
        let took = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let start = match *next {
            Some(t) if t > now => t,
            _ => now,
        };
        let done = start + took;
        *next = Some(done);
        done
    }
}

struct Shared {
    upstream: SocketAddr,
    seed: u64,
    faults: watch::Sender<NetFaults>,
    counters: Counters,
    up: Link,
    down: Link,
}

/// A running fault proxy; dropping it stops it and closes every
/// connection it holds.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 for a free one) and forwards every
    /// connection to `upstream`, with no fault set. The upstream is
    /// connected per connection, so it may start later.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        seed: u64,
    ) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(NetFaults::default());
        let shared = Arc::new(Shared {
            upstream,
            seed,
            faults,
            counters: Counters::default(),
            up: Link {
                next_free: Mutex::new(None),
            },
            down: Link {
                next_free: Mutex::new(None),
            },
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy { addr, shared, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the fault set; it applies to the next chunk of every
    /// connection.
    pub fn set(&self, faults: NetFaults) {
        self.shared.faults.send_replace(faults);
    }

    /// Clears every fault.
    pub fn clear(&self) {
        self.set(NetFaults::default());
    }

    /// The fault set in force.
    pub fn faults(&self) -> NetFaults {
        self.shared.faults.borrow().clone()
    }

    /// The counts so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            connections: get(&c.connections),
            resets: get(&c.resets),
            silenced: get(&c.silenced),
            stalls: get(&c.stalls),
            held: get(&c.held),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept loop owns every connection task (a JoinSet), so
        // aborting it closes them all.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    let mut number = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of descriptors, or similar: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                number += 1;
                shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                connections.spawn(connection(client, shared.clone(), number));
            }
            // Reap finished connections so that the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client (the sidecar) to the upstream: requests.
    Up,
    /// Upstream to the client: answers.
    Down,
}

/// How a direction's pump ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Its source closed and everything read was delivered.
    Eof,
    /// A socket error.
    Error,
    /// The connection was reset on purpose.
    Reset,
}

fn rng_for(seed: u64, number: u64, direction: Direction) -> StdRng {
    let d = match direction {
        Direction::Up => 1,
        Direction::Down => 2,
    };
    StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(number.wrapping_mul(0x2545_F491_4F6C_DD1D))
            .wrapping_add(d),
    )
}

async fn connection(client: TcpStream, shared: Arc<Shared>, number: u64) {
    let _ = client.set_nodelay(true);
    let mut faults = shared.faults.subscribe();
    if faults.borrow().half_open {
        shared.counters.silenced.fetch_add(1, Ordering::Relaxed);
        return swallow(client).await;
    }
    // A partition delays the upstream connect (SYNs retransmitted until
    // the link is back).
    if faults.borrow().partition {
        shared.counters.held.fetch_add(1, Ordering::Relaxed);
        if faults.wait_for(|f| !f.partition).await.is_err() {
            return;
        }
    }
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        // The client sees the connection closed, as it would see a refusal
        // through a proxy.
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let dead = Arc::new(AtomicBool::new(false));
    let up = pump(
        client_r,
        up_w,
        Direction::Up,
        shared.clone(),
        dead.clone(),
        number,
    );
    let down = pump(
        up_r,
        client_w,
        Direction::Down,
        shared.clone(),
        dead,
        number,
    );
    tokio::pin!(up, down);
    // Whichever direction ends first ends the connection; dropping the
    // other closes its sockets (after a reset, the client's socket closes
    // with SO_LINGER 0, which sends an RST).
    tokio::select! {
        _ = &mut up => {}
        _ = &mut down => {}
    }
}

/// A connection accepted while `half_open` holds: read and dropped until
/// the client gives up, never answered.
async fn swallow(mut client: TcpStream) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    while let Ok(n) = client.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Moves bytes from `src` to `dst` through the faults, a reader and a
/// writer joined by a bounded queue.
async fn pump(
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    direction: Direction,
    shared: Arc<Shared>,
    dead: Arc<AtomicBool>,
    number: u64,
) -> Ending {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(32);
    let reader = async move {
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            match src.read(&mut buf).await {
                Ok(0) => return Ending::Eof,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send((Instant::now(), buf)).await.is_err() {
                        return Ending::Error;
                    }
                }
                Err(_) => return Ending::Error,
            }
        }
    };
    let writer = async move {
        let mut faults = shared.faults.subscribe();
        let mut rng = rng_for(shared.seed, number, direction);
        let mut due = Instant::now();
        let mut reset: Option<ResetState> = None;
        while let Some((arrived, chunk)) = rx.recv().await {
            // A partition holds everything until it clears.
            if faults.borrow().partition {
                shared.counters.held.fetch_add(1, Ordering::Relaxed);
                if faults.wait_for(|f| !f.partition).await.is_err() {
                    return Ending::Error;
                }
            }
            let now_faults = faults.borrow().clone();
            if now_faults.half_open && !dead.swap(true, Ordering::Relaxed) {
                shared.counters.silenced.fetch_add(1, Ordering::Relaxed);
            }
            if dead.load(Ordering::Relaxed) {
                // The peer hangs: bytes are taken and dropped.
                continue;
            }
            if let Some(l) = now_faults.latency {
                let jitter = l.jitter_ms.min(l.ms) as i64;
                let ms = l.ms as i64 + rng.random_range(-jitter..=jitter);
                due = due.max(arrived + Duration::from_millis(ms.max(0) as u64));
                tokio::time::sleep_until(due).await;
            }
            // How much of this chunk goes out before a reset, if any.
            let mut send = chunk.len();
            let mut reset_now = false;
            if direction == Direction::Down {
                match now_faults.reset_mid_body {
                    Some(r) => {
                        let state = reset.get_or_insert_with(|| ResetState {
                            window: 0,
                            body_left: None,
                            allowance: rng.random_range(r.min_bytes..=r.max_bytes.max(r.min_bytes)),
                        });
                        if let Some(n) = state.cut(&chunk) {
                            send = n;
                            reset_now = true;
                        }
                    }
                    None => reset = None,
                }
            }
            let link = match direction {
                Direction::Up => &shared.up,
                Direction::Down => &shared.down,
            };
            for segment in chunk[..send].chunks(SEGMENT_BYTES) {
                if let Some(loss) = now_faults.loss {
                    let mut rto = Duration::from_millis(loss.rto_ms);
                    let mut stall = Duration::ZERO;
                    let mut tries = 0;
                    while tries < MAX_RETRIES && rng.random_bool(loss.probability.clamp(0.0, 1.0)) {
                        stall += rto;
                        rto *= 2;
                        tries += 1;
                    }
                    if !stall.is_zero() {
                        shared.counters.stalls.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(stall).await;
                    }
                }
                if let Some(rate) = now_faults.bandwidth {
                    tokio::time::sleep_until(link.book(segment.len(), rate)).await;
                }
                if dst.write_all(segment).await.is_err() {
                    return Ending::Error;
                }
            }
            let counter = match direction {
                Direction::Up => &shared.counters.bytes_up,
                Direction::Down => &shared.counters.bytes_down,
            };
            counter.fetch_add(send as u64, Ordering::Relaxed);
            if reset_now {
                shared.counters.resets.fetch_add(1, Ordering::Relaxed);
                let _ = dst.flush().await;
                // RST instead of FIN: SO_LINGER 0, and the write half is
                // not shut down when dropped; the socket closes (resets)
                // when the read half goes too, which ends the connection.
                let _ = dst.as_ref().set_zero_linger();
                dst.forget();
                return Ending::Reset;
            }
        }
        if direction == Direction::Down && dead.load(Ordering::Relaxed) {
            // The upstream closed a connection that went silent: the client
            // must not see it close; it is held until the client gives up.
            std::future::pending::<()>().await;
        }
        Ending::Eof
    };
    tokio::pin!(reader, writer);
    let mut reading = true;
    loop {
        tokio::select! {
            r = &mut reader, if reading => {
                reading = false;
                if r == Ending::Error {
                    return Ending::Error;
                }
                // On EOF the queue's sender is gone with the reader: the
                // writer delivers what is queued, then ends.
            }
            // On EOF the write half is dropped with the writer, which
            // passes the close on (a FIN).
            w = &mut writer => return w,
        }
    }
}

/// Where in an answer a reset falls.
struct ResetState {
    /// The last four bytes seen, to find the end of the headers across
    /// chunk boundaries.
    window: u32,
    /// Body bytes still to pass once the headers ended.
    body_left: Option<u64>,
    /// Body bytes to pass before the reset.
    allowance: u64,
}

impl ResetState {
    /// Scans `chunk`; `Some(n)` when the reset falls in it, after its
    /// first `n` bytes.
    fn cut(&mut self, chunk: &[u8]) -> Option<usize> {
        for (i, b) in chunk.iter().enumerate() {
            if let Some(left) = self.body_left {
                if left == 0 {
                    return Some(i);
                }
                self.body_left = Some(left - 1);
                continue;
            }
            self.window = (self.window << 8) | u32::from(*b);
            if self.window == u32::from_be_bytes(*b"\r\n\r\n") {
                self.body_left = Some(self.allowance);
            }
        }
        match self.body_left {
            Some(0) => Some(chunk.len()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every test's exchanges are bounded by this.
    const LIMIT: Duration = Duration::from_secs(10);

    /// An echo server on loopback; returns its address and a count of the
    /// connections it accepted.
    async fn echo() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, accepted)
    }

    /// An HTTP server answering every request with a 200 and `body_len`
    /// bytes of body.
    async fn http(body_len: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let mut answer =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n\r\n")
                            .into_bytes();
                    answer.extend(std::iter::repeat_n(b'x', body_len));
                    let _ = s.write_all(&answer).await;
                    let _ = s.flush().await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                });
            }
        });
        addr
    }

    async fn proxy_to(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream, 42)
            .await
            .unwrap()
    }

    /// Sends `data` through an echo and reads it back; the time it took.
    async fn round_trip(s: &mut TcpStream, data: &[u8]) -> Duration {
        let started = Instant::now();
        s.write_all(data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        tokio::time::timeout(LIMIT, s.read_exact(&mut back))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(back, data);
        started.elapsed()
    }

    #[tokio::test]
    async fn without_faults_bytes_pass_both_ways() {
        let (echo, _) = echo().await;
        let proxy = proxy_to(echo).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let took = round_trip(&mut s, &data).await;
        assert!(took < Duration::from_secs(2), "{took:?}");
        let stats = proxy.stats();
        assert_eq!(stats.connections, 1);
        assert_eq!(stats.bytes_up, data.len() as u64);
    }

    #[tokio::test]
    async fn latency_with_jitter_delays_each_direction() {
        let (echo, _) = echo().await;
        let proxy = proxy_to(echo).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s, b"warm").await;
        proxy.set(NetFaults {
            latency: Some(Latency {
                ms: 150,
                jitter_ms: 50,
            }),
            ..NetFaults::default()
        });
        for _ in 0..3 {
            let took = round_trip(&mut s, b"ping").await;
            // Two one-way delays of 100..200 ms each.
            assert!(took >= Duration::from_millis(200), "{took:?}");
            assert!(took < Duration::from_millis(1500), "{took:?}");
        }
        proxy.clear();
        // Under the 200 ms the fault could not go below.
        let took = round_trip(&mut s, b"fast").await;
        assert!(took < Duration::from_millis(200), "{took:?}");
    }

    #[tokio::test]
    async fn bandwidth_limits_the_rate() {
        let (echo, _) = echo().await;
        let proxy = proxy_to(echo).await;
        proxy.set(NetFaults {
            bandwidth: Some(100_000),
            ..NetFaults::default()
        });
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        // 50 KB each way at 100 KB/s: at least half a second.
        let data = vec![7u8; 50_000];
        let took = round_trip(&mut s, &data).await;
        assert!(took >= Duration::from_millis(480), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn reset_mid_body_cuts_the_answer_with_an_rst() {
        let server = http(10_000).await;
        let proxy = proxy_to(server).await;
        proxy.set(NetFaults {
            reset_mid_body: Some(ResetMidBody {
                min_bytes: 10,
                max_bytes: 100,
            }),
            ..NetFaults::default()
        });
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        let end = tokio::time::timeout(LIMIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Some(e.kind()),
                }
            }
        })
        .await
        .expect("the reset comes in time");
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
        let head = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let body = got.len() - head;
        assert!((10..=100).contains(&body), "{body} body bytes passed");
        assert_eq!(proxy.stats().resets, 1);
    }

    #[tokio::test]
    async fn half_open_accepts_and_stays_silent_until_cleared() {
        let (echo, accepted) = echo().await;
        let proxy = proxy_to(echo).await;
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut old, b"before").await;
        proxy.set(NetFaults {
            half_open: true,
            ..NetFaults::default()
        });
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"hello?").await.unwrap();
        let mut buf = [0u8; 16];
        let silent = tokio::time::timeout(Duration::from_millis(400), s.read(&mut buf)).await;
        assert!(silent.is_err(), "a half-open connection answered");
        // The established connection has gone silent too.
        old.write_all(b"anyone?").await.unwrap();
        let silent = tokio::time::timeout(Duration::from_millis(400), old.read(&mut buf)).await;
        assert!(silent.is_err(), "an established connection still answered");
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "never connected upstream"
        );
        proxy.clear();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut fresh, b"after").await;
        assert_eq!(proxy.stats().silenced, 2);
    }

    #[tokio::test]
    async fn a_silenced_connection_stays_open_when_the_upstream_closes_it() {
        // An upstream that closes every connection 200 ms after it began.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(s);
                });
            }
        });
        let proxy = proxy_to(upstream).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        // Connected upstream before the fault; silenced by the first bytes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.set(NetFaults {
            half_open: true,
            ..NetFaults::default()
        });
        s.write_all(b"hello?").await.unwrap();
        let mut buf = [0u8; 16];
        let silent = tokio::time::timeout(Duration::from_millis(600), s.read(&mut buf)).await;
        assert!(silent.is_err(), "the client saw {silent:?}, not silence");
    }

    #[tokio::test]
    async fn loss_stalls_each_lost_segment_by_the_rto() {
        let (echo, _) = echo().await;
        let proxy = proxy_to(echo).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s, b"warm").await;
        // Every segment lost MAX_RETRIES times: 20 × (1+2+4+8) = 300 ms
        // each way.
        proxy.set(NetFaults {
            loss: Some(Loss {
                probability: 1.0,
                rto_ms: 20,
            }),
            ..NetFaults::default()
        });
        let took = round_trip(&mut s, b"x").await;
        assert!(took >= Duration::from_millis(600), "{took:?}");
        assert!(proxy.stats().stalls >= 2);
        proxy.set(NetFaults {
            loss: Some(Loss {
                probability: 0.0,
                rto_ms: 20,
            }),
            ..NetFaults::default()
        });
        // Well under the 600 ms of a stall each way.
        let took = round_trip(&mut s, b"y").await;
        assert!(took < Duration::from_millis(300), "{took:?}");
    }

    #[tokio::test]
    async fn partition_holds_everything_until_it_heals() {
        let (echo, accepted) = echo().await;
        let proxy = proxy_to(echo).await;
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut old, b"before").await;
        proxy.set(NetFaults {
            partition: true,
            ..NetFaults::default()
        });
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        fresh.write_all(b"new").await.unwrap();
        old.write_all(b"old").await.unwrap();
        let mut buf = [0u8; 3];
        assert!(
            tokio::time::timeout(Duration::from_millis(400), old.read(&mut buf))
                .await
                .is_err(),
            "a byte crossed the partition"
        );
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "connected through the partition"
        );
        proxy.clear();
        // What was held is delivered once it heals.
        for (s, want) in [(&mut old, b"old"), (&mut fresh, b"new")] {
            tokio::time::timeout(LIMIT, s.read_exact(&mut buf))
                .await
                .expect("delivered after the partition")
                .unwrap();
            assert_eq!(&buf, want);
        }
    }

    #[test]
    fn the_rng_is_the_same_for_the_same_seed_connection_and_direction() {
        let draw = |seed, n, d| {
            let mut r = rng_for(seed, n, d);
            (0..8).map(|_| r.random::<u32>()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, 3, Direction::Up), draw(1, 3, Direction::Up));
        assert_ne!(draw(1, 3, Direction::Up), draw(1, 3, Direction::Down));
        assert_ne!(draw(1, 3, Direction::Up), draw(1, 4, Direction::Up));
        assert_ne!(draw(1, 3, Direction::Up), draw(2, 3, Direction::Up));
    }

    #[test]
    fn the_reset_falls_after_the_allowance_of_body_bytes() {
        let mut state = ResetState {
            window: 0,
            body_left: None,
            allowance: 5,
        };
        assert_eq!(state.cut(b"HTTP/1.1 200 OK\r\nA: b\r"), None);
        // The header ends across the chunk boundary; 3 body bytes follow.
        assert_eq!(state.cut(b"\n\r\nabc"), None);
        assert_eq!(state.cut(b"defgh"), Some(2));
        let mut state = ResetState {
            window: 0,
            body_left: None,
            allowance: 0,
        };
        assert_eq!(state.cut(b"H\r\n\r\nbody"), Some(5));
    }

    #[test]
    fn faults_read_from_json_and_unknown_fields_are_refused() {
        let f: NetFaults = serde_json::from_str(
            r#"{"latency":{"ms":300,"jitter_ms":200},"bandwidth":65536,"loss":{"probability":0.05,"rto_ms":200}}"#,
        )
        .unwrap();
        assert_eq!(f.latency.unwrap().jitter_ms, 200);
        assert_eq!(f.bandwidth, Some(65536));
        assert!(!f.is_clear());
        assert!(NetFaults::default().is_clear());
        assert!(serde_json::from_str::<NetFaults>(r#"{"jitter":1}"#).is_err());
    }
}
