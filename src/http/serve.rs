//! The API's HTTP server: hyper's HTTP/1 connection handling with bounds a slow or hostile
//! client cannot get around (header read time, idle time, open connections, request time).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

/// What one client may hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client address may hold at once; more are answered 429 and closed,
    /// so one client cannot take every connection.
    pub max_connections_per_ip: usize,
    /// Longest wait for a request's headers, on a new or a kept-alive connection.
    pub header_timeout: Duration,
}

/// Largest buffer hyper keeps for one connection's headers.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long connections get to finish their requests after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writing the refusal to a client over its address's share may take.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// What a client over its address's share of connections is told before the connection
/// closes.
const TOO_MANY_CONNECTIONS: &str =
    r#"{"error":{"code":"rate_limited","message":"too many connections from this address; close some first"}}"#;

/// Open connections per client address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// One of an address's open connections, given back when dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// A slot for `ip`, unless it holds `limit` connections already.
    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot { table: self.clone(), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Tell a client over its share why its connection closes (best effort, bounded).
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        let answer = format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{TOO_MANY_CONNECTIONS}",
            TOO_MANY_CONNECTIONS.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serve `router` on `listener` until `shutdown` resolves, then let requests in flight
/// finish (within a bound).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEADER_BYTES);
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = open.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, a connection reset before accept: wait, go on.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let Some(slot) = per_address.take(peer.ip(), limits.max_connections_per_ip.max(1)) else {
            tracing::debug!(%peer, "refused a connection over its address's share");
            tokio::spawn(async move {
                refuse(stream).await;
                drop(permit);
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Handlers and the gate see who is calling (per-address limits).
        let service = router.clone().map_request(move |mut request: axum::extract::Request<_>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        });
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop((slot, permit));
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("API connections still open after the drain timeout; closing them");
    }
    Ok(())
}
