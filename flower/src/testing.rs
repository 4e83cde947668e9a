//! A scripted Flower server for tests: it sends exactly the messages it is given,
//! including ones flwr's server never sends (bad tensors, instructions this protocol
//! does not know), and records every reply.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::proto::flower_service_server::{FlowerService, FlowerServiceServer};
use crate::proto::server_message::Msg;
use crate::proto::{ClientMessage, ServerMessage};

/// Messages to send on each connection, in order of connection; each message waits for
/// the client's reply before the next goes out.
pub type Script = Vec<Vec<ServerMessage>>;

/// Replies received on each connection.
pub type Transcript = Vec<Vec<ClientMessage>>;

/// A running scripted server.
#[derive(Debug)]
pub struct ScriptedServer {
    pub addr: SocketAddr,
    transcript: Arc<Mutex<Transcript>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Service {
    script: Arc<Mutex<VecDeque<Vec<ServerMessage>>>>,
    transcript: Arc<Mutex<Transcript>>,
    /// Sessions that do not end in a ReconnectIns are aborted right after their last
    /// message, without waiting for its answer (flwr's round_timeout).
    abort: bool,
}

#[tonic::async_trait]
impl FlowerService for Service {
    type JoinStream = ReceiverStream<Result<ServerMessage, Status>>;

    async fn join(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let mut inbound = request.into_inner();
        let messages = self
            .script
            .lock()
            .map_err(|_| Status::internal("script lock"))?
            .pop_front()
            .unwrap_or_default();
        let session = {
            let mut t = self
                .transcript
                .lock()
                .map_err(|_| Status::internal("transcript lock"))?;
            t.push(Vec::new());
            t.len() - 1
        };
        let transcript = Arc::clone(&self.transcript);
        let dismisses = messages
            .last()
            .is_some_and(|m| matches!(m.msg, Some(Msg::ReconnectIns(_))));
        let abort = self.abort && !dismisses;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let count = messages.len();
            for (i, m) in messages.into_iter().enumerate() {
                if tx.send(Ok(m)).await.is_err() {
                    return;
                }
                if abort && i + 1 == count {
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(
                            "Timeout of 1.0sec was exceeded.",
                        )))
                        .await;
                    return;
                }
                match inbound.message().await {
                    Ok(Some(reply)) => {
                        if let Ok(mut t) = transcript.lock() {
                            t[session].push(reply);
                        }
                    }
                    _ => return,
                }
            }
            // Script done. Like flwr's servicer after a ReconnectIns, keep the stream
            // open until the client hangs up (or a minute passes); other scripts end
            // the stream, as a server that drops a client does.
            if !dismisses {
                return;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl ScriptedServer {
    /// Starts serving `script` on 127.0.0.1 (a free port), in plain text.
    pub fn start(script: Script) -> std::io::Result<Self> {
        Self::start_with(script, None)
    }

    /// Like [`Self::start`], but every session that does not end in a ReconnectIns is
    /// aborted with DEADLINE_EXCEEDED right after its last message, as flwr aborts a
    /// client's stream when its round_timeout passes.
    pub fn start_aborting(script: Script) -> std::io::Result<Self> {
        Self::serve(script, None, true)
    }

    /// Starts serving `script`; with `tls = Some((certificate PEM, key PEM))`, over TLS.
    pub fn start_with(script: Script, tls: Option<(Vec<u8>, Vec<u8>)>) -> std::io::Result<Self> {
        Self::serve(script, tls, false)
    }

    fn serve(
        script: Script,
        tls: Option<(Vec<u8>, Vec<u8>)>,
        abort: bool,
    ) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let service = Service {
            script: Arc::new(Mutex::new(script.into())),
            transcript: Arc::clone(&transcript),
            abort,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                let mut builder = tonic::transport::Server::builder();
                if let Some((cert, key)) = tls {
                    let identity = tonic::transport::Identity::from_pem(cert, key);
                    match builder
                        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    {
                        Ok(b) => builder = b,
                        Err(e) => {
                            eprintln!("scripted server: TLS setup failed: {e}");
                            return;
                        }
                    }
                }
                let _ = builder
                    .add_service(FlowerServiceServer::new(service))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Ok(Self {
            addr,
            transcript,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The replies so far.
    pub fn transcript(&self) -> Transcript {
        self.transcript
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    /// Stops the server and returns every reply it received.
    pub fn finish(mut self) -> Transcript {
        self.shutdown();
        self.transcript()
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
