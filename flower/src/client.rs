//! The client side of Flower's streaming transport: connect (with retries), answer
//! each server instruction through a [`Client`], leave or come back when the server
//! says so.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::npy::{NpyArray, NpyError};
use crate::proto::client_message::{
    self, DisconnectRes, EvaluateRes, FitRes, GetParametersRes, GetPropertiesRes,
};
use crate::proto::flower_service_client::FlowerServiceClient;
use crate::proto::server_message::Msg;
use crate::proto::{ClientMessage, Code, Parameters, Reason, Scalar, ServerMessage, Status};

/// The `tensor_type` of numpy byte tensors, which flwr's stock strategies read.
pub const NUMPY_TENSOR_TYPE: &str = "numpy.ndarray";

/// flwr's default gRPC message limit (`GRPC_MAX_MESSAGE_LENGTH`, 512 MiB): adapters of
/// large models fit, and the server must be started with the same value.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 536_870_912;

/// How long the TCP connection itself may take.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A method every gRPC server answers at once, whether it serves it (SERVING) or not
/// (UNIMPLEMENTED, as flwr's server does), without touching the Flower service: the
/// first request on each connection, to learn that the server speaks gRPC at all.
const PROBE_PATH: &str = "/grpc.health.v1.Health/Check";

/// A value of a config or metrics map.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Double(f64),
    U64(u64),
    I64(i64),
    Bool(bool),
    String(String),
    Bytes(Vec<u8>),
}

/// A config (server → client) or metrics/properties (client → server) map.
pub type Config = BTreeMap<String, Value>;

impl Value {
    /// A non-negative integer value, whichever integer type (or a whole double)
    /// carried it: Python ints arrive as sint64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Double(v) if v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53) => Some(v as u64),
            _ => None,
        }
    }
}

/// What a fit returns to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOutput {
    pub parameters: Vec<NpyArray>,
    /// n_k: the weight of this update in the server's FedAvg.
    pub num_examples: u64,
    pub metrics: Config,
}

/// What an evaluation returns to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateOutput {
    pub loss: f32,
    pub num_examples: u64,
    pub metrics: Config,
}

/// A participant's answers to the server's four kinds of work. An `Err` is sent back to
/// the server as that instruction's failure status, with the error's `Display` text as
/// the message (the round goes on without this client); the client stays connected.
pub trait Client: Send + 'static {
    /// Why the client refused an instruction. Only its `Display` text reaches the
    /// server (not its `source` chain), so that text should say everything the server's
    /// operator needs.
    type Error: std::error::Error + Send + Sync + 'static;

    fn get_properties(&mut self, config: &Config) -> Result<Config, Self::Error>;
    fn get_parameters(&mut self, config: &Config) -> Result<Vec<NpyArray>, Self::Error>;
    fn fit(&mut self, parameters: Vec<NpyArray>, config: &Config)
    -> Result<FitOutput, Self::Error>;
    fn evaluate(
        &mut self,
        parameters: Vec<NpyArray>,
        config: &Config,
    ) -> Result<EvaluateOutput, Self::Error>;
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT`.
    pub server: String,
    /// PEM root certificate(s) of the server's CA: TLS when given, plain text otherwise.
    pub root_certificates: Option<Vec<u8>>,
    /// The TLS name to verify (defaults to the host of `server`).
    pub tls_domain: Option<String>,
    pub max_message_bytes: usize,
    /// Connection attempts before giving up (at least 1).
    pub attempts: u32,
    /// Wait before the second attempt; doubled after each failure up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Once the server has accepted the TCP connection, how long it may take to finish
    /// the TLS handshake and answer a first gRPC request; also how long it may take to
    /// acknowledge a keep-alive ping. A server that accepts connections but never
    /// speaks (a frozen process, a service that is not gRPC) would otherwise keep the
    /// client waiting forever.
    pub answer_timeout: Duration,
    /// How long the connection may stay silent before the client pings the server
    /// (HTTP/2 PING, which a live gRPC server acknowledges even while it has no
    /// instruction for us); `None`: never ping. A stock gRPC server (flwr's included)
    /// closes a connection whose client pings more often than every 5 minutes without
    /// data (`grpc.http2.min_ping_interval_without_data_ms`, 3 strikes), and a Flower
    /// server may leave a client idle much longer than that between rounds, so the
    /// default stays above 5 minutes.
    pub keepalive_interval: Option<Duration>,
}

/// The default [`Options::answer_timeout`].
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// The default [`Options::keepalive_interval`]: 6 minutes, a margin over gRPC's
/// 5-minute minimum for pings without data.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(360);

impl Options {
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            root_certificates: None,
            tls_domain: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
        }
    }
}

#[derive(Debug, Error)]
pub enum FlowerError {
    #[error("bad server address {0:?}: expected HOST:PORT")]
    Address(String),
    #[error("TLS setup for {server}: {why}")]
    Tls { server: String, why: String },
    /// Root certificates that hold no usable certificate: tonic would skip them
    /// silently and every handshake would then fail for want of a trusted CA.
    #[error("root certificates {label}: {why}")]
    Certificates { label: String, why: String },
    /// The server's certificate was refused in the TLS handshake; retrying cannot help.
    /// `name_mismatch`: it is not valid for `domain`, the name the client checked.
    #[error(
        "the Flower server at {server} presented a certificate that was refused: {why} ({})",
        if *.name_mismatch {
            format!("the client checked the name {:?}; --tls-domain, by default the host of --server, must be a name the certificate holds", .domain)
        } else {
            "is it signed by the CA in --root-certificates?".to_owned()
        }
    )]
    Certificate {
        server: String,
        domain: String,
        why: String,
        name_mismatch: bool,
    },
    /// The server accepted TCP connections but never answered within `seconds` (no TLS
    /// handshake, no HTTP/2, no gRPC response), on each of `attempts` tries.
    #[error(
        "the server at {server} accepted the connection but did not answer within {seconds} s ({attempts} attempts): is it a gRPC (HTTP/2) server, and is it running?"
    )]
    Silent {
        server: String,
        attempts: u32,
        seconds: f64,
    },
    #[error(
        "cannot reach the Flower server at {server} after {attempts} attempts over {seconds:.1} s: {last}"
    )]
    Unreachable {
        server: String,
        attempts: u32,
        seconds: f64,
        last: String,
    },
    /// The server accepted connections but ended `attempts` streams in a row before
    /// sending anything; `last` is how the last one ended. Without TLS (`tls` false),
    /// the message suggests it, since a TLS server treats plain text this way.
    #[error(
        "the Flower server at {server} ended {attempts} streams in a row before sending an instruction: {last}{}",
        if *.tls { "" } else { " (a server started with certificates needs --root-certificates)" }
    )]
    Refused {
        server: String,
        attempts: u32,
        last: String,
        tls: bool,
    },
    /// The tokio runtime of [`run`] could not be built.
    #[error("async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// How the conversation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Instructions answered, over all connections.
    pub answered: u64,
    /// Connections made (1 + reconnections).
    pub sessions: u64,
}

/// Runs `client` against the server until the server dismisses it: a blocking call that
/// owns a small tokio runtime. Training runs on a blocking thread, so the connection
/// keeps being served while a fit takes minutes.
pub fn run<C: Client>(client: C, options: &Options) -> Result<Summary, FlowerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(FlowerError::Runtime)?;
    runtime.block_on(run_async(client, options))
}

/// [`run`] inside an existing runtime.
pub async fn run_async<C: Client>(client: C, options: &Options) -> Result<Summary, FlowerError> {
    let endpoint = endpoint(options)?;
    let client = Arc::new(Mutex::new(client));
    let mut summary = Summary {
        answered: 0,
        sessions: 0,
    };
    // Streams that broke before the server sent anything, in a row: a server that
    // accepts connections but refuses us (plain text against TLS, a proxy) must not
    // make us reconnect in a tight loop forever.
    let mut barren = 0u32;
    let mut backoff = Backoff::new(options);
    loop {
        let channel = connect(&endpoint, options).await?;
        summary.sessions += 1;
        let Session {
            end,
            received,
            answered,
        } = session(channel, &client, options).await;
        summary.answered += answered;
        match end {
            End::Leave => return Ok(summary),
            End::Reconnect(seconds) => {
                log(&format!("server asked to reconnect in {seconds} s"));
                tokio::time::sleep(Duration::from_secs(seconds)).await;
            }
            End::Lost(why) if received == 0 => {
                barren += 1;
                if barren >= options.attempts.max(1) {
                    return Err(FlowerError::Refused {
                        server: options.server.clone(),
                        attempts: barren,
                        last: why,
                        tls: options.root_certificates.is_some(),
                    });
                }
                let wait = backoff.next();
                log(&format!(
                    "stream ended before any instruction ({why}); retrying in {:.1} s",
                    wait.as_secs_f64()
                ));
                tokio::time::sleep(wait).await;
            }
            // A stream lost mid-federation (server restarted, network cut) is retried
            // like a first connection; `connect` gives up if the server stays away.
            End::Lost(why) => {
                barren = 0;
                backoff = Backoff::new(options);
                log(&format!("connection lost ({why}); reconnecting"));
            }
        }
    }
}

fn log(message: &str) {
    eprintln!("flower: {message}");
}

fn endpoint(options: &Options) -> Result<Endpoint, FlowerError> {
    let bad = || FlowerError::Address(options.server.clone());
    let (host, port) = options.server.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let scheme = if options.root_certificates.is_some() {
        "https"
    } else {
        "http"
    };
    // The TCP connect timeout and TCP_NODELAY live in `Dialer`: tonic applies its own
    // only to its built-in connector.
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", options.server))
        .map_err(|_| bad())?
        .keep_alive_timeout(options.answer_timeout)
        // Our connections always carry the Join stream; a stock gRPC server allows
        // pings without any call only every 2 hours, so never ping an idle one.
        .keep_alive_while_idle(false);
    if let Some(interval) = options.keepalive_interval {
        endpoint = endpoint.http2_keep_alive_interval(interval);
    }
    if let (Some(pem), Some(domain)) = (&options.root_certificates, tls_domain(options)) {
        check_root_certificates(pem, "(Options::root_certificates)")?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(domain);
        endpoint = endpoint.tls_config(tls).map_err(|e| FlowerError::Tls {
            server: options.server.clone(),
            why: error_chain(&e),
        })?;
    }
    Ok(endpoint)
}

/// The name the server's certificate must hold, when TLS is on: `tls_domain`, or the
/// host of `server`.
fn tls_domain(options: &Options) -> Option<String> {
    options.root_certificates.as_ref()?;
    Some(options.tls_domain.clone().unwrap_or_else(|| {
        let host = options.server.rsplit_once(':').map_or("", |(h, _)| h);
        host.trim_matches(['[', ']']).to_owned()
    }))
}

/// Checks that `pem` holds at least one PEM certificate and that every certificate in
/// it parses; returns how many there are. tonic skips anything else without a word,
/// which leaves TLS with no trusted CA and every handshake failing for reasons the
/// user cannot see. `label` (a file name) is named in the error.
pub fn check_root_certificates(pem: &[u8], label: &str) -> Result<usize, FlowerError> {
    let fail = |why: String| FlowerError::Certificates {
        label: label.to_owned(),
        why,
    };
    let mut count = 0;
    for (index, der) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let der = der.map_err(|e| fail(format!("certificate {}: bad PEM: {e}", index + 1)))?;
        rustls::RootCertStore::empty().add(der).map_err(|e| {
            fail(format!(
                "certificate {} is not a valid X.509 certificate ({e})",
                index + 1
            ))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(fail(
            "no PEM certificate (a -----BEGIN CERTIFICATE----- block) in it".into(),
        ));
    }
    Ok(count)
}

/// Connects with exponential backoff. A refused certificate ends the tries at once.
async fn connect(endpoint: &Endpoint, options: &Options) -> Result<Channel, FlowerError> {
    let start = Instant::now();
    let attempts = options.attempts.max(1);
    let mut backoff = Backoff::new(options);
    let mut last = Failure::Other(String::new());
    for attempt in 1..=attempts {
        match connect_once(endpoint, options).await {
            Ok(channel) => return Ok(channel),
            Err(Failure::Certificate { why, name_mismatch }) => {
                return Err(FlowerError::Certificate {
                    server: options.server.clone(),
                    domain: tls_domain(options).unwrap_or_default(),
                    why,
                    name_mismatch,
                });
            }
            Err(failure) => {
                last = failure;
                if attempt < attempts {
                    let wait = backoff.next();
                    log(&format!(
                        "attempt {attempt}/{attempts} to reach {} failed ({}); retrying in {:.1} s",
                        options.server,
                        last.describe(options),
                        wait.as_secs_f64()
                    ));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    Err(match last {
        Failure::Silent => FlowerError::Silent {
            server: options.server.clone(),
            attempts,
            seconds: options.answer_timeout.as_secs_f64(),
        },
        other => FlowerError::Unreachable {
            server: options.server.clone(),
            attempts,
            seconds: start.elapsed().as_secs_f64(),
            last: other.describe(options),
        },
    })
}

/// Why one connection attempt failed.
enum Failure {
    /// TCP was accepted, then nothing within `answer_timeout`.
    Silent,
    /// The TLS handshake refused the server's certificate.
    Certificate { why: String, name_mismatch: bool },
    /// Anything else (refused, unreachable, reset), with its whole cause chain.
    Other(String),
}

impl Failure {
    fn describe(&self, options: &Options) -> String {
        match self {
            Failure::Silent => format!(
                "the connection was accepted but nothing answered within {} s",
                options.answer_timeout.as_secs_f64()
            ),
            Failure::Certificate { why, .. } | Failure::Other(why) => why.clone(),
        }
    }

    fn of(e: &tonic::transport::Error) -> Self {
        let why = error_chain(e);
        match certificate_error(e) {
            Some(c) => Failure::Certificate {
                why,
                name_mismatch: matches!(
                    c,
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                ),
            },
            None => Failure::Other(why),
        }
    }
}

/// The rustls certificate error somewhere in `e`'s causes. tokio-rustls hands it over
/// inside an `io::Error`, whose `source()` skips the wrapped error, so each
/// `io::Error` is opened by hand.
fn certificate_error<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e rustls::CertificateError> {
    let mut next = Some(e);
    while let Some(e) = next {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(rustls::Error::InvalidCertificate(c)) =
                candidate.downcast_ref::<rustls::Error>()
            {
                return Some(c);
            }
        }
        next = e.source();
    }
    None
}

/// One try: TCP (bounded by `TCP_CONNECT_TIMEOUT`), then the TLS handshake and a first
/// gRPC answer, which must come within `answer_timeout` of the server accepting TCP.
async fn connect_once(endpoint: &Endpoint, options: &Options) -> Result<Channel, Failure> {
    let (dialer, accepted) = Dialer::new(&options.server);
    let work = async {
        let channel = endpoint
            .connect_with_connector(dialer)
            .await
            .map_err(|e| Failure::of(&e))?;
        probe(channel.clone()).await;
        Ok(channel)
    };
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return done,
        // Accepted, or the dial failed (sender dropped): either way `work` goes on.
        _ = accepted => {}
    }
    tokio::time::timeout(options.answer_timeout, work)
        .await
        .unwrap_or(Err(Failure::Silent))
}

/// Sends one request that any gRPC server answers without delay ([`PROBE_PATH`]) and
/// waits for the answer, whatever it says. Failures are left to the Join stream that
/// follows, which reports them as it always has; only silence matters here, and the
/// caller times it.
async fn probe(channel: Channel) {
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return;
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::from_static(PROBE_PATH);
    let _ = grpc.unary(tonic::Request::new(()), path, codec).await;
}

/// Opens TCP connections for tonic (which adds TLS on top), and says once when the
/// server has accepted one, so that the wait for its answer is timed from there.
#[derive(Clone)]
struct Dialer {
    server: Arc<str>,
    accepted: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl Dialer {
    fn new(server: &str) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let dialer = Self {
            server: server.into(),
            accepted: Arc::new(Mutex::new(Some(tx))),
        };
        (dialer, rx)
    }

    async fn dial(self) -> std::io::Result<TokioIo<TcpStream>> {
        let tcp = tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(&*self.server))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no TCP connection within {} s",
                        TCP_CONNECT_TIMEOUT.as_secs()
                    ),
                )
            })??;
        tcp.set_nodelay(true)?;
        if let Some(tx) = self.accepted.lock().ok().and_then(|mut slot| slot.take()) {
            let _ = tx.send(());
        }
        Ok(TokioIo::new(tcp))
    }
}

impl tower::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    // The address is `server` itself, not the URI's: `TcpStream::connect` resolves
    // HOST:PORT (brackets and all) as the user wrote it.
    fn call(&mut self, _: Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

/// Waits between tries: `initial_backoff`, doubled after each, at most `max_backoff`.
struct Backoff {
    wait: Duration,
    max: Duration,
}

impl Backoff {
    fn new(options: &Options) -> Self {
        Self {
            wait: options.initial_backoff,
            max: options.max_backoff,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.wait;
        self.wait = (wait * 2).min(self.max);
        wait
    }
}

/// `e` and its causes, each once: wrappers that show their cause's text (an
/// `io::Error` around a rustls error) would otherwise repeat it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    out
}

enum End {
    Leave,
    Reconnect(u64),
    Lost(String),
}

/// One `Join` stream: answer instructions until the server dismisses us or the stream
/// breaks. Returns how it ended and how many instructions were answered.
async fn session<C: Client>(
    channel: Channel,
    client: &Arc<Mutex<C>>,
    options: &Options,
) -> Session {
    let mut grpc = FlowerServiceClient::new(channel)
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes);
    let (tx, rx) = mpsc::channel::<ClientMessage>(1);
    let mut out = Session {
        end: End::Leave,
        received: 0,
        answered: 0,
    };
    let mut inbound = match grpc.join(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            out.end = End::Lost(status_text(&status));
            return out;
        }
    };
    loop {
        let message = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                out.end = End::Lost("the server closed the stream".into());
                return out;
            }
            Err(status) => {
                out.end = End::Lost(status_text(&status));
                return out;
            }
        };
        out.received += 1;
        let (reply, end) = answer(client, message).await;
        if tx.send(reply).await.is_err() {
            // The server gave up on this stream while we worked (flwr aborts it when
            // a round_timeout passes): say why it did, and that the answer is lost.
            let why = match inbound.message().await {
                Err(status) => status_text(&status),
                Ok(_) => "the request stream closed".into(),
            };
            out.end = End::Lost(format!(
                "{why}; the answer to the last instruction was lost"
            ));
            return out;
        }
        out.answered += 1;
        if let Some(end) = end {
            // flwr's servicer keeps the stream open after a DisconnectRes until the
            // call is cancelled: give the reply a moment to leave, then hang up
            // (dropping the stream cancels the call) rather than wait for the server.
            drop(tx);
            let drain = async { while let Ok(Some(_)) = inbound.message().await {} };
            let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
            out.end = end;
            return out;
        }
    }
}

/// How one stream went.
struct Session {
    end: End,
    /// Instructions the server sent.
    received: u64,
    /// Instructions answered.
    answered: u64,
}

/// A status and, for one the transport made (not the server), its causes: tonic's
/// message alone is often just "transport error".
fn status_text(status: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        out.push_str(": ");
        out.push_str(&error_chain(source));
    }
    out
}

/// The reply to one server message, and whether the session ends after it.
async fn answer<C: Client>(
    client: &Arc<Mutex<C>>,
    message: ServerMessage,
) -> (ClientMessage, Option<End>) {
    let Some(msg) = message.msg else {
        // An instruction this protocol version does not know (a newer server, or a
        // field we never declared). The server waits for one reply per instruction;
        // an empty ClientMessage is the neutral answer the protocol allows.
        log("unknown server message (no instruction this client knows); answered empty");
        return (ClientMessage { msg: None }, None);
    };
    if let Msg::ReconnectIns(r) = msg {
        let end = if r.seconds > 0 {
            End::Reconnect(r.seconds.unsigned_abs())
        } else {
            End::Leave
        };
        // flwr's own client answers every ReconnectIns with RECONNECT (its proto3
        // `seconds` is never unset); its server reads ACK as UNKNOWN.
        let reply = client_message::Msg::DisconnectRes(DisconnectRes {
            reason: Reason::Reconnect as i32,
        });
        return (ClientMessage { msg: Some(reply) }, Some(end));
    }
    let client = Arc::clone(client);
    // Kept for the reply if the handler dies: the server waits for an answer of the kind
    // it asked for.
    let kind = Kind::of(&msg);
    // Training and evaluation are long and CPU-bound: off the async threads.
    let handled = tokio::task::spawn_blocking(move || {
        let mut c = match client.lock() {
            Ok(guard) => guard,
            // A handler that panicked left the client in an unknown state; its data
            // is still ours to use (no invariant spans the lock).
            Err(poisoned) => poisoned.into_inner(),
        };
        dispatch(&mut *c, msg)
    })
    .await;
    let reply = handled
        .unwrap_or_else(|e| failure_reply(kind, format!("the client's handler crashed: {e}")));
    (ClientMessage { msg: Some(reply) }, None)
}

/// The instruction a reply answers.
#[derive(Clone, Copy)]
enum Kind {
    Properties,
    Parameters,
    Fit,
    Evaluate,
}

impl Kind {
    fn of(msg: &Msg) -> Self {
        match msg {
            Msg::GetPropertiesIns(_) => Kind::Properties,
            // Reconnects never reach a handler; the arm only makes the match total.
            Msg::GetParametersIns(_) | Msg::ReconnectIns(_) => Kind::Parameters,
            Msg::FitIns(_) => Kind::Fit,
            Msg::EvaluateIns(_) => Kind::Evaluate,
        }
    }
}

/// A failure answer to an instruction of `kind`. flwr's server maps every status code
/// it does not know to OK, so a failure carries the instruction's NOT_IMPLEMENTED code
/// (the only non-OK codes the protocol has) and the reason as the message.
fn failure_reply(kind: Kind, why: String) -> client_message::Msg {
    use client_message::Msg as Out;
    match kind {
        Kind::Properties => Out::GetPropertiesRes(GetPropertiesRes {
            status: Some(failure(Code::GetPropertiesNotImplemented, why)),
            properties: BTreeMap::new(),
        }),
        Kind::Parameters => Out::GetParametersRes(GetParametersRes {
            status: Some(failure(Code::GetParametersNotImplemented, why)),
            parameters: Some(encode(&[])),
        }),
        Kind::Fit => Out::FitRes(FitRes {
            status: Some(failure(Code::FitNotImplemented, why)),
            parameters: Some(encode(&[])),
            ..FitRes::default()
        }),
        Kind::Evaluate => Out::EvaluateRes(EvaluateRes {
            status: Some(failure(Code::EvaluateNotImplemented, why)),
            ..EvaluateRes::default()
        }),
    }
}

fn ok() -> Status {
    Status {
        code: Code::Ok as i32,
        message: "Success".into(),
    }
}

fn failure(code: Code, message: String) -> Status {
    log(&format!("answering {code:?}: {message}"));
    Status {
        code: code as i32,
        message,
    }
}

/// Why an instruction is answered with a failure: the client's refusal, or what the
/// transport itself cannot accept. Its `Display` text is the status message.
#[derive(Debug, Error)]
enum Refusal<E> {
    #[error("{0}")]
    Client(E),
    #[error("tensor_type {found:?} is not supported (expected {NUMPY_TENSOR_TYPE:?})")]
    TensorType { found: String },
    #[error("tensor {index}: {source}")]
    Tensor { index: usize, source: NpyError },
    /// flwr's FedAvg divides by the sum of num_examples: a zero weight from every
    /// client would crash the server's round.
    #[error("the fit reports 0 examples; FedAvg cannot weight it")]
    NoExamples,
}

/// Calls the client for one instruction; a refusal becomes [`failure_reply`].
fn dispatch<C: Client>(client: &mut C, msg: Msg) -> client_message::Msg {
    let kind = Kind::of(&msg);
    call(client, msg).unwrap_or_else(|why| failure_reply(kind, why.to_string()))
}

/// The client's successful answer, or why it refused.
fn call<C: Client>(client: &mut C, msg: Msg) -> Result<client_message::Msg, Refusal<C::Error>> {
    use client_message::Msg as Out;
    Ok(match msg {
        Msg::GetPropertiesIns(ins) => Out::GetPropertiesRes(GetPropertiesRes {
            status: Some(ok()),
            properties: to_proto(
                client
                    .get_properties(&from_proto(ins.config))
                    .map_err(Refusal::Client)?,
            ),
        }),
        Msg::GetParametersIns(ins) => Out::GetParametersRes(GetParametersRes {
            status: Some(ok()),
            parameters: Some(encode(
                &client
                    .get_parameters(&from_proto(ins.config))
                    .map_err(Refusal::Client)?,
            )),
        }),
        Msg::FitIns(ins) => {
            let out = client
                .fit(decode(ins.parameters)?, &from_proto(ins.config))
                .map_err(Refusal::Client)?;
            if out.num_examples == 0 {
                return Err(Refusal::NoExamples);
            }
            Out::FitRes(FitRes {
                status: Some(ok()),
                parameters: Some(encode(&out.parameters)),
                num_examples: out.num_examples as i64,
                metrics: to_proto(out.metrics),
            })
        }
        Msg::EvaluateIns(ins) => {
            let out = client
                .evaluate(decode(ins.parameters)?, &from_proto(ins.config))
                .map_err(Refusal::Client)?;
            Out::EvaluateRes(EvaluateRes {
                status: Some(ok()),
                loss: out.loss,
                num_examples: out.num_examples as i64,
                metrics: to_proto(out.metrics),
            })
        }
        // Handled by the caller before any dispatch.
        Msg::ReconnectIns(_) => Out::DisconnectRes(DisconnectRes {
            reason: Reason::Reconnect as i32,
        }),
    })
}

fn encode(tensors: &[NpyArray]) -> Parameters {
    Parameters {
        tensors: tensors.iter().map(NpyArray::to_bytes).collect(),
        tensor_type: NUMPY_TENSOR_TYPE.into(),
    }
}

/// The server's tensors, or why they cannot be read.
fn decode<E>(parameters: Option<Parameters>) -> Result<Vec<NpyArray>, Refusal<E>> {
    let Some(p) = parameters else {
        return Ok(Vec::new());
    };
    if !p.tensors.is_empty() && p.tensor_type != NUMPY_TENSOR_TYPE {
        return Err(Refusal::TensorType {
            found: p.tensor_type,
        });
    }
    p.tensors
        .iter()
        .enumerate()
        .map(|(index, b)| {
            NpyArray::from_bytes(b).map_err(|source| Refusal::Tensor { index, source })
        })
        .collect()
}

fn from_proto(map: BTreeMap<String, Scalar>) -> Config {
    use crate::proto::scalar::Scalar as S;
    map.into_iter()
        .filter_map(|(k, v)| {
            let value = match v.scalar? {
                S::Double(x) => Value::Double(x),
                S::Uint64(x) => Value::U64(x),
                S::Sint64(x) => Value::I64(x),
                S::Bool(x) => Value::Bool(x),
                S::String(x) => Value::String(x),
                S::Bytes(x) => Value::Bytes(x),
            };
            Some((k, value))
        })
        .collect()
}

fn to_proto(config: Config) -> BTreeMap<String, Scalar> {
    use crate::proto::scalar::Scalar as S;
    config
        .into_iter()
        .map(|(k, v)| {
            let s = match v {
                Value::Double(x) => S::Double(x),
                Value::U64(x) => S::Uint64(x),
                Value::I64(x) => S::Sint64(x),
                Value::Bool(x) => S::Bool(x),
                Value::String(x) => S::String(x),
                Value::Bytes(x) => S::Bytes(x),
            };
            (k, Scalar { scalar: Some(s) })
        })
        .collect()
}
