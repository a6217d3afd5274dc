//! `logitprobe serve`: an OpenAI-compatible HTTP server with logprobs and the probe inside.
//!
//! One model is loaded on an engine thread of its own ([`engine`]), which runs the generation
//! loop over a queue of requests: concurrent requests share the batch of slots, each with its
//! own sampling settings and random stream (its seed, its choice index), so a request gives
//! the same tokens alone or under load. The handlers ([`handlers`]) are small functions on
//! axum / tokio that turn requests into jobs and the engine's events into OpenAI's (or
//! llama-server's) responses.

pub mod api;
pub mod engine;
mod extract;
mod handlers;
pub mod llama_server;
pub mod openai;

use crate::dist::logprobs::LogprobsMode;
use crate::dist::probe::ProbeConfig;
use crate::dist::sampler::SamplingConfig;
use crate::generate::GenerateConfig;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use logitprobe_backends::{usage, LogitSource, Vocab};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Slots: sequences decoded together.
    pub parallel: usize,
    /// Requests that may wait for a slot; more are refused with 503.
    pub max_queue: usize,
    /// Every endpoint but `/health` and the viewer page needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most top logprobs a request may ask for.
    pub max_logprobs: usize,
    pub logprobs_mode: LogprobsMode,
    pub max_body_bytes: usize,
    /// The probe's settings for requests with `"probe": true`.
    pub probe: ProbeConfig,
    /// The model id clients send; the model's name when `None`.
    pub alias: Option<String>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub queued: AtomicI64,
    pub slots_busy: AtomicI64,
}

/// What the handlers share.
pub(crate) struct AppState {
    jobs: SyncSender<engine::Job>,
    model_id: String,
    n_ctx: usize,
    n_slots: usize,
    created: u64,
    cfg: ServeConfig,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

/// The model facts the engine thread reports once it has loaded the model.
struct Loaded {
    name: String,
    n_ctx: usize,
}

/// Loads the model with `open` on the engine thread, then serves until SIGINT / SIGTERM.
/// `on_listen` gets the bound address (port 0 picks a free one).
pub fn run(
    open: impl FnOnce() -> anyhow::Result<Box<dyn LogitSource>> + Send + 'static,
    cfg: ServeConfig,
    on_listen: impl FnOnce(std::net::SocketAddr, &str, usize),
) -> anyhow::Result<()> {
    if cfg.parallel == 0 {
        return Err(usage!("0 slots serve nothing: use 1 or more"));
    }
    if cfg.max_logprobs > cfg.probe.max_k {
        return Err(usage!(
            "{} top logprobs need a probe that keeps as many candidates: raise the probe's max_k to {} or lower the logprobs limit",
            cfg.max_logprobs,
            cfg.max_logprobs
        ));
    }
    let metrics = Arc::new(Metrics::default());
    let shutdown = Arc::new(AtomicBool::new(false));
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<engine::Job>(cfg.max_queue);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<Loaded>>();
    let n_slots = cfg.parallel;
    let engine = {
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let probe = cfg.probe.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let mut source = match open().and_then(|mut s| s.begin(n_slots).map(|_| s)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let info = source.info();
                let _ = ready_tx.send(Ok(Loaded {
                    name: info.name.clone(),
                    n_ctx: info.n_ctx,
                }));
                let base = GenerateConfig {
                    sampling: SamplingConfig::default(),
                    probe,
                    max_new_tokens: 16,
                    ignore_eos: false,
                    seed: 0,
                    probe_enabled: false,
                    logprobs: None,
                    prompt_logprobs: false,
                    inside: None,
                };
                engine::run(&mut *source, job_rx, &base, n_slots, metrics, shutdown);
            })?
    };
    let loaded = ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the engine thread ended before loading the model"))??;

    let state = Arc::new(AppState {
        jobs: job_tx,
        model_id: cfg.alias.clone().unwrap_or(loaded.name),
        n_ctx: loaded.n_ctx,
        n_slots,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cfg: cfg.clone(),
        metrics,
        next_id: AtomicU64::new(1),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .map_err(|e| {
                usage!(
                    "cannot listen on {}:{}: {e}; pick another port or host",
                    cfg.host,
                    cfg.port
                )
            })?;
        on_listen(listener.local_addr()?, &state.model_id, n_slots);
        let app = router(state.clone());
        let stop = shutdown.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                wait_for_signal().await;
                tracing::info!("shutting down: ending the requests in flight");
                stop.store(true, Ordering::Relaxed);
            })
            .await
            .map_err(anyhow::Error::from)
    });
    shutdown.store(true, Ordering::Relaxed);
    drop(state);
    let _ = engine.join();
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    let authed = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/completion", post(handlers::llama_completion))
        .route("/v1/models", get(handlers::models))
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    // The viewer page holds no data (a browser cannot send the key's header to load it): it
    // asks for the key and sends it with its API calls.
    Router::new()
        .route("/health", get(handlers::health))
        .route("/", get(handlers::viewer))
        .merge(authed)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        // A client that sends its body slower than this is cut off (slow-loris).
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_secs(30),
        ))
        .with_state(state)
}

/// `--api-key`: every route but `/health` and the viewer page needs `Authorization: Bearer
/// <key>`, compared in constant time.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &state.cfg.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if subtle::ConstantTimeEq::ct_eq(given.as_bytes(), key.as_bytes()).into() {
        next.run(req).await
    } else {
        api::ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "a valid API key is needed: send the header 'Authorization: Bearer <key>'"
                .into(),
            param: None,
            code: Some("invalid_api_key"),
        }
        .into_response()
    }
}
