//! A TCP proxy that breaks the connections it carries on cue, the way networks and brokers
//! fail: every open connection reset, traffic black-holed (connections stay open, nothing
//! moves either way), new connections refused (and open ones reset). [`broker_behind_proxy`]
//! starts a tansu broker that advertises the proxy, so every connection a Kafka client makes,
//! bootstrap and partition leaders alike, passes through it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::{free_port, tansu, Service};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes flow both ways.
    Forward,
    /// Connections stay open and new ones are accepted, but no byte moves either way.
    BlackHole,
    /// New connections are refused (the port is closed); open ones are reset.
    Refuse,
}

/// One fault, injected through a [`FaultProxy`].
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Nothing moves on any connection for this many seconds.
    BlackHole(f64),
    /// New connections refused and open ones reset, for this many seconds.
    Refuse(f64),
    /// Every open connection reset this many times, 1 s apart.
    Resets(usize),
}

impl Fault {
    /// How long the broker is away, in seconds.
    pub fn lasts(self) -> f64 {
        match self {
            Fault::Refuse(s) | Fault::BlackHole(s) => s,
            Fault::Resets(n) => n.saturating_sub(1) as f64,
        }
    }

    /// Injects the fault and returns once it is over (the proxy forwarding again).
    pub async fn inject(self, proxy: &FaultProxy) {
        match self {
            Fault::BlackHole(s) => {
                proxy.black_hole();
                tokio::time::sleep(Duration::from_secs_f64(s)).await;
            }
            Fault::Refuse(s) => {
                proxy.refuse();
                tokio::time::sleep(Duration::from_secs_f64(s)).await;
            }
            Fault::Resets(n) => {
                for i in 0..n {
                    proxy.reset();
                    if i + 1 < n {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        proxy.forward();
    }
}

/// The proxy: `address` is where clients connect; it forwards to `upstream`.
pub struct FaultProxy {
    pub address: String,
    mode: watch::Sender<Mode>,
    resets: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        Self::start_on(free_port()?, upstream).await
    }

    /// Listens on `port` and forwards to `upstream`.
    pub async fn start_on(port: u16, upstream: &str) -> anyhow::Result<Self> {
        let listener = listen(port).await?;
        let (mode, _) = watch::channel(Mode::Forward);
        let (resets, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            port,
            upstream.to_string(),
            mode.clone(),
            resets.clone(),
            accepted.clone(),
        ));
        Ok(Self {
            address: format!("127.0.0.1:{port}"),
            mode,
            resets,
            accepted,
            task,
        })
    }

    /// Resets every open connection (RST); new ones are accepted.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }

    /// Stalls all traffic until [`FaultProxy::forward`].
    pub fn black_hole(&self) {
        self.mode.send_replace(Mode::BlackHole);
    }

    /// Refuses new connections and resets open ones until [`FaultProxy::forward`].
    pub fn refuse(&self) {
        self.mode.send_replace(Mode::Refuse);
    }

    /// Lets traffic flow again.
    pub fn forward(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// How many connections the proxy has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.resets.send_modify(|n| *n += 1);
    }
}

async fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(([127, 0, 0, 1], port).into())
        .with_context(|| format!("binding the fault proxy to port {port}"))?;
    Ok(socket.listen(1024)?)
}

async fn accept_loop(
    mut listener: TcpListener,
    port: u16,
    upstream: String,
    mode: watch::Sender<Mode>,
    resets: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
) {
    let mut watching = mode.subscribe();
    loop {
        tokio::select! {
            inbound = listener.accept() => {
                let Ok((inbound, _)) = inbound else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(carry(inbound, upstream.clone(), mode.subscribe(), resets.subscribe()));
            }
            refusing = watching.wait_for(|m| *m == Mode::Refuse) => {
                if refusing.is_err() {
                    return;
                }
            }
        }
        if *watching.borrow() == Mode::Refuse {
            // A closed port: connecting is refused by the kernel, as with a broker down.
            drop(listener);
            if watching.wait_for(|m| *m != Mode::Refuse).await.is_err() {
                return;
            }
            listener = loop {
                match listen(port).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
        }
    }
}

/// Carries one connection until either side closes it or a fault resets it.
async fn carry(
    mut inbound: TcpStream,
    upstream: String,
    mut mode: watch::Receiver<Mode>,
    mut resets: watch::Receiver<u64>,
) {
    resets.mark_unchanged();
    // A connection made during a black-hole waits, unanswered, like its traffic.
    let flowing = async { mode.wait_for(|m| *m == Mode::Forward).await.is_ok() };
    tokio::select! {
        ok = flowing => if !ok { return },
        _ = resets.changed() => return reset(&inbound),
    }
    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
        return reset(&inbound);
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let mut refusing = mode.clone();
    {
        let (mut in_read, mut in_write) = inbound.split();
        let (mut out_read, mut out_write) = outbound.split();
        let up = pump(&mut in_read, &mut out_write, mode.clone());
        let down = pump(&mut out_read, &mut in_write, mode.clone());
        tokio::select! {
            _ = async { tokio::join!(up, down) } => return,
            _ = resets.changed() => {}
            _ = refusing.wait_for(|m| *m == Mode::Refuse) => {}
        }
    }
    reset(&inbound);
    reset(&outbound);
}

/// Copies `from` to `to` while the mode is [`Mode::Forward`]; holds the bytes otherwise.
async fn pump(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if mode.wait_for(|m| *m == Mode::Forward).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if mode.wait_for(|m| *m == Mode::Forward).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Closes with RST, not FIN: the peer sees "connection reset".
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// A fresh tansu broker whose every client connection passes through a [`FaultProxy`]: the
/// service's address is the proxy's, and the broker advertises it, so clients reach partition
/// leaders through it too.
pub async fn broker_behind_proxy() -> anyhow::Result<(Service, FaultProxy)> {
    let broker_port = free_port()?;
    let proxy_port = free_port()?;
    let broker_address = format!("127.0.0.1:{broker_port}");
    let proxy = FaultProxy::start_on(proxy_port, &broker_address).await?;
    let mut service = tokio::task::spawn_blocking(move || {
        tansu(broker_port, &format!("tcp://127.0.0.1:{proxy_port}"))
    })
    .await??;
    // Bootstrap through the proxy too: a direct bootstrap connection would stay up through
    // every fault, and librdkafka uses any connection that is up for metadata.
    service.address = proxy.address.clone();
    Ok((service, proxy))
}
