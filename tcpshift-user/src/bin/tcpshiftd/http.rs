//! The HTTP endpoint of `--metrics ADDR`, served by hyper (HTTP/1.1, one request per
//! connection):
//!
//! - `GET /metrics`: Prometheus text, rendered from the kernel maps at each request
//!   ([`tcpshift::metrics::render`]);
//! - `GET /healthz`: 200 while tcpshiftd runs (a liveness probe);
//! - `GET /readyz`: 200 when the sk_lookup program is attached and every subset with a weight
//!   above 0 has a live socket, else 503 with the first reason, in plain text.
//!
//! `HEAD` works for each; other paths get 404, other methods 405. At most [`MAX_CONNECTIONS`]
//! connections are served at once (more wait in the kernel's accept queue); a request head
//! larger than [`MAX_HEAD`] is refused, and a connection is closed when its head has not
//! arrived within [`HEAD_TIMEOUT`] or it is not done within [`CONNECTION_TIMEOUT`], so slow or
//! endless clients cannot hold the endpoint.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tcpshift::{metrics, state::State};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, info, warn};

/// Connections open at the same time. Idle or slow clients cost a task and a file
/// descriptor each until [`HEAD_TIMEOUT`]; rendering is serialised by the state's lock. A
/// limit well above what scrapers and probes need keeps a handful of idle clients from
/// delaying them, and a flood from exhausting the daemon's file descriptors.
pub const MAX_CONNECTIONS: usize = 256;
/// Largest request head (request line and headers), in bytes (hyper's minimum buffer).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time allowed for a request head to arrive.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a whole connection (request and response).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

const TEXT: &str = "text/plain; charset=utf-8";

/// Binds `addr` (before anything is changed: an address that cannot be bound fails the
/// start).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    listener
        .set_nonblocking(true)
        .context("cannot make the metrics socket non-blocking")?;
    Ok(listener)
}

/// Serves the endpoint on `listener` from a task of the current runtime, reading `state`.
/// With `fleet`, /metrics also carries the store follower's metrics.
pub fn spawn(
    listener: std::net::TcpListener,
    state: State,
    fleet: Option<crate::fleet::Fleet>,
) -> Result<()> {
    let listener =
        TcpListener::from_std(listener).context("cannot serve metrics on the bound socket")?;
    if let Ok(address) = listener.local_addr() {
        info!(%address, "serving metrics at /metrics, health at /healthz and /readyz");
    }
    tokio::spawn(serve(listener, Arc::new(Mutex::new(state)), fleet));
    Ok(())
}

async fn serve(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    fleet: Option<crate::fleet::Fleet>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                let fleet = fleet.clone();
                async move { Ok::<_, Infallible>(respond(&req, &state, fleet.as_ref())) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "metrics connection: {e}"),
                Err(_) => debug!(%peer, "metrics connection closed after {CONNECTION_TIMEOUT:?}"),
            }
        });
    }
}

/// The response to one request (hyper leaves the body out for `HEAD`).
fn respond(
    req: &Request<Incoming>,
    state: &Mutex<State>,
    fleet: Option<&crate::fleet::Fleet>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => match read(state, |s| {
            metrics::render(s).context("cannot encode metrics")
        }) {
            Ok(mut body) => {
                if let Some(fleet) = fleet {
                    body.push_str(&fleet.status.borrow().prometheus(&fleet.node));
                }
                reply(StatusCode::OK, metrics::CONTENT_TYPE, body)
            }
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("cannot read tcpshift's state: {e:#}\n"),
            ),
        },
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => match read(state, |s| Ok(not_ready(s))) {
            Ok(None) => reply(StatusCode::OK, TEXT, "ready\n".into()),
            Ok(Some(reason)) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {reason}\n"),
            ),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: cannot read tcpshift's state: {e:#}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: tcpshiftd serves /metrics, /healthz and /readyz\n".into(),
        ),
    }
}

/// Reads the status from the kernel and passes it to `f`.
fn read<T>(
    state: &Mutex<State>,
    f: impl FnOnce(&tcpshift::state::Status) -> Result<T>,
) -> Result<T> {
    let status = state
        .lock()
        .map_err(|_| anyhow::anyhow!("metrics state poisoned"))?
        .status()?;
    f(&status)
}

/// Why the namespace is not ready to steer every service as configured, if it is not.
fn not_ready(status: &tcpshift::state::Status) -> Option<String> {
    if status.program_id.is_none() {
        return Some("the sk_lookup program is not attached".into());
    }
    let dead: Vec<String> = status
        .services
        .iter()
        .flat_map(|svc| {
            svc.subsets
                .iter()
                .filter(|s| s.weight > 0 && !s.live)
                .map(move |s| format!("{}/{} (weight {})", svc.name, s.name, s.weight))
        })
        .collect();
    (!dead.is_empty()).then(|| {
        format!(
            "no live socket for {}: nothing listens on its backend address",
            dead.join(", ")
        )
    })
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
