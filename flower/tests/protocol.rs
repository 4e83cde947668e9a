//! The client against a scripted server: every instruction answered as the protocol
//! says, failures reported as statuses without dropping the connection, unknown
//! instructions answered empty, reconnects honoured, an unreachable server reported
//! after the retries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fibecfed_flower::proto::client_message::Msg as Reply;
use fibecfed_flower::proto::server_message::{
    EvaluateIns, FitIns, GetParametersIns, GetPropertiesIns, Msg, ReconnectIns,
};
use fibecfed_flower::proto::{Code, Parameters, Reason, Scalar, ServerMessage, scalar};
use fibecfed_flower::testing::ScriptedServer;
use fibecfed_flower::{
    Client, Config, EvaluateOutput, FitOutput, FlowerError, NUMPY_TENSOR_TYPE, NpyArray, Options,
    Value,
};

/// Adds 1 to every value of a 2×2 tensor; refuses other shapes.
struct AddOne;

/// AddOne's refusal: the tensors it was sent, by count and shape.
#[derive(Debug, thiserror::Error)]
#[error("expected one 2x2 tensor, got {count} tensors (shapes {shapes:?})")]
struct NotOne2x2 {
    count: usize,
    shapes: Vec<Vec<usize>>,
}

fn check(p: &[NpyArray]) -> Result<(), NotOne2x2> {
    if p.len() != 1 || p[0].shape != [2, 2] {
        return Err(NotOne2x2 {
            count: p.len(),
            shapes: p.iter().map(|t| t.shape.clone()).collect(),
        });
    }
    Ok(())
}

impl Client for AddOne {
    type Error = NotOne2x2;
    fn get_properties(&mut self, config: &Config) -> Result<Config, NotOne2x2> {
        let mut out = config.clone();
        out.insert("name".into(), Value::String("add-one".into()));
        Ok(out)
    }
    fn get_parameters(&mut self, _: &Config) -> Result<Vec<NpyArray>, NotOne2x2> {
        Ok(vec![NpyArray::new(vec![2, 2], vec![0.0; 4]).unwrap()])
    }
    fn fit(&mut self, p: Vec<NpyArray>, config: &Config) -> Result<FitOutput, NotOne2x2> {
        check(&p)?;
        let data = p[0].data.iter().map(|v| v + 1.0).collect();
        Ok(FitOutput {
            parameters: vec![NpyArray::new(vec![2, 2], data).unwrap()],
            num_examples: 7,
            metrics: config.clone(),
        })
    }
    fn evaluate(&mut self, p: Vec<NpyArray>, _: &Config) -> Result<EvaluateOutput, NotOne2x2> {
        check(&p)?;
        Ok(EvaluateOutput {
            loss: p[0].data.iter().sum(),
            num_examples: 3,
            metrics: Config::new(),
        })
    }
}

fn msg(m: Msg) -> ServerMessage {
    ServerMessage { msg: Some(m) }
}

#[allow(clippy::unnecessary_wraps)] // Parameters fields are optional in proto3.
fn params(tensors: Vec<Vec<u8>>) -> Option<Parameters> {
    Some(Parameters {
        tensors,
        tensor_type: NUMPY_TENSOR_TYPE.into(),
    })
}

fn tensor(data: [f32; 4]) -> Vec<u8> {
    NpyArray::new(vec![2, 2], data.to_vec()).unwrap().to_bytes()
}

fn leave() -> ServerMessage {
    msg(Msg::ReconnectIns(ReconnectIns { seconds: 0 }))
}

fn options(server: &ScriptedServer) -> Options {
    let mut o = Options::new(server.addr.to_string());
    o.attempts = 3;
    o.initial_backoff = Duration::from_millis(50);
    o
}

fn decode(p: Option<&Parameters>) -> Vec<NpyArray> {
    p.unwrap()
        .tensors
        .iter()
        .map(|b| NpyArray::from_bytes(b).unwrap())
        .collect()
}

fn scalar_of(s: scalar::Scalar) -> Scalar {
    Scalar { scalar: Some(s) }
}

#[test]
fn answers_every_instruction_and_leaves_when_dismissed() {
    let server = ScriptedServer::start(vec![vec![
        msg(Msg::GetPropertiesIns(GetPropertiesIns {
            config: [(
                "server_round".to_owned(),
                scalar_of(scalar::Scalar::Sint64(4)),
            )]
            .into(),
        })),
        msg(Msg::GetParametersIns(GetParametersIns::default())),
        msg(Msg::FitIns(FitIns {
            parameters: params(vec![tensor([1.0, 2.0, 3.0, 4.0])]),
            config: [("lr".to_owned(), scalar_of(scalar::Scalar::Double(0.5)))].into(),
        })),
        msg(Msg::EvaluateIns(EvaluateIns {
            parameters: params(vec![tensor([1.0, 1.0, 1.0, 1.5])]),
            config: BTreeMap::new(),
        })),
        leave(),
    ]])
    .unwrap();
    let summary = fibecfed_flower::run(AddOne, &options(&server)).unwrap();
    assert_eq!((summary.answered, summary.sessions), (5, 1));
    let t = server.finish();
    let replies: Vec<Reply> = t[0].iter().map(|m| m.msg.clone().unwrap()).collect();
    let Reply::GetPropertiesRes(props) = &replies[0] else {
        panic!("{:?}", replies[0])
    };
    assert_eq!(props.status.as_ref().unwrap().code, Code::Ok as i32);
    assert_eq!(
        props.properties["server_round"].scalar,
        Some(scalar::Scalar::Sint64(4))
    );
    let Reply::GetParametersRes(gp) = &replies[1] else {
        panic!("{:?}", replies[1])
    };
    assert_eq!(
        gp.parameters.as_ref().unwrap().tensor_type,
        NUMPY_TENSOR_TYPE
    );
    assert_eq!(decode(gp.parameters.as_ref())[0].data, [0.0; 4]);
    let Reply::FitRes(fit) = &replies[2] else {
        panic!("{:?}", replies[2])
    };
    assert_eq!(fit.status.as_ref().unwrap().code, Code::Ok as i32);
    assert_eq!(fit.num_examples, 7);
    assert_eq!(
        decode(fit.parameters.as_ref())[0].data,
        [2.0, 3.0, 4.0, 5.0]
    );
    assert_eq!(fit.metrics["lr"].scalar, Some(scalar::Scalar::Double(0.5)));
    let Reply::EvaluateRes(ev) = &replies[3] else {
        panic!("{:?}", replies[3])
    };
    assert_eq!((ev.loss, ev.num_examples), (4.5, 3));
    let Reply::DisconnectRes(d) = &replies[4] else {
        panic!("{:?}", replies[4])
    };
    assert_eq!(d.reason, Reason::Reconnect as i32);
}

#[test]
fn failures_become_statuses_and_unknown_instructions_get_an_empty_answer() {
    let server = ScriptedServer::start(vec![vec![
        // Three tensors where the model has one.
        msg(Msg::FitIns(FitIns {
            parameters: params(vec![tensor([0.0; 4]); 3]),
            config: BTreeMap::new(),
        })),
        // Not a .npy file.
        msg(Msg::EvaluateIns(EvaluateIns {
            parameters: params(vec![b"pickle".to_vec()]),
            config: BTreeMap::new(),
        })),
        // A tensor type this client cannot read.
        msg(Msg::FitIns(FitIns {
            parameters: Some(Parameters {
                tensors: vec![tensor([0.0; 4])],
                tensor_type: "torch.Tensor".into(),
            }),
            config: BTreeMap::new(),
        })),
        // No instruction this protocol version knows.
        ServerMessage { msg: None },
        // Still connected and working.
        msg(Msg::FitIns(FitIns {
            parameters: params(vec![tensor([0.0; 4])]),
            config: BTreeMap::new(),
        })),
        leave(),
    ]])
    .unwrap();
    let summary = fibecfed_flower::run(AddOne, &options(&server)).unwrap();
    assert_eq!(summary.answered, 6);
    let t = server.finish();
    let r: Vec<Option<Reply>> = t[0].iter().map(|m| m.msg.clone()).collect();
    let Some(Reply::FitRes(f)) = &r[0] else {
        panic!("{:?}", r[0])
    };
    let st = f.status.as_ref().unwrap();
    // flwr reads unknown codes as OK, so failures use the instruction's own code.
    assert_eq!(st.code, Code::FitNotImplemented as i32);
    // The message is the client error's Display text, exactly.
    assert_eq!(
        st.message,
        "expected one 2x2 tensor, got 3 tensors (shapes [[2, 2], [2, 2], [2, 2]])"
    );
    let Some(Reply::EvaluateRes(e)) = &r[1] else {
        panic!("{:?}", r[1])
    };
    let st = e.status.as_ref().unwrap();
    assert_eq!(st.code, Code::EvaluateNotImplemented as i32);
    assert!(
        st.message.starts_with("tensor 0: not a .npy tensor"),
        "{}",
        st.message
    );
    let Some(Reply::FitRes(f)) = &r[2] else {
        panic!("{:?}", r[2])
    };
    assert_eq!(
        f.status.as_ref().unwrap().message,
        "tensor_type \"torch.Tensor\" is not supported (expected \"numpy.ndarray\")"
    );
    assert_eq!(r[3], None, "unknown instruction: empty answer");
    let Some(Reply::FitRes(f)) = &r[4] else {
        panic!("{:?}", r[4])
    };
    assert_eq!(f.status.as_ref().unwrap().code, Code::Ok as i32);
}

/// Panics in every evaluation: a bug in the client's own code.
struct Buggy;

impl Client for Buggy {
    type Error = NotOne2x2;
    fn get_properties(&mut self, c: &Config) -> Result<Config, NotOne2x2> {
        AddOne.get_properties(c)
    }
    fn get_parameters(&mut self, c: &Config) -> Result<Vec<NpyArray>, NotOne2x2> {
        AddOne.get_parameters(c)
    }
    fn fit(&mut self, p: Vec<NpyArray>, c: &Config) -> Result<FitOutput, NotOne2x2> {
        AddOne.fit(p, c)
    }
    fn evaluate(&mut self, _: Vec<NpyArray>, _: &Config) -> Result<EvaluateOutput, NotOne2x2> {
        panic!("bug in evaluate")
    }
}

#[test]
fn a_crashing_handler_is_answered_with_a_failure_of_the_right_kind() {
    let server = ScriptedServer::start(vec![vec![
        msg(Msg::EvaluateIns(EvaluateIns {
            parameters: params(vec![tensor([0.0; 4])]),
            config: BTreeMap::new(),
        })),
        msg(Msg::FitIns(FitIns {
            parameters: params(vec![tensor([0.0; 4])]),
            config: BTreeMap::new(),
        })),
        leave(),
    ]])
    .unwrap();
    let summary = fibecfed_flower::run(Buggy, &options(&server)).unwrap();
    assert_eq!(summary.answered, 3);
    let t = server.finish();
    let Some(Reply::EvaluateRes(e)) = &t[0][0].msg else {
        panic!("{:?}", t[0][0])
    };
    let st = e.status.as_ref().unwrap();
    assert_eq!(st.code, Code::EvaluateNotImplemented as i32);
    assert!(st.message.contains("crashed"), "{}", st.message);
    // The client survives its own bug and keeps working.
    let Some(Reply::FitRes(f)) = &t[0][1].msg else {
        panic!("{:?}", t[0][1])
    };
    assert_eq!(f.status.as_ref().unwrap().code, Code::Ok as i32);
}

/// Reports a fit over no examples.
struct NoExamples;

impl Client for NoExamples {
    type Error = NotOne2x2;
    fn get_properties(&mut self, c: &Config) -> Result<Config, NotOne2x2> {
        AddOne.get_properties(c)
    }
    fn get_parameters(&mut self, c: &Config) -> Result<Vec<NpyArray>, NotOne2x2> {
        AddOne.get_parameters(c)
    }
    fn fit(&mut self, p: Vec<NpyArray>, c: &Config) -> Result<FitOutput, NotOne2x2> {
        let mut out = AddOne.fit(p, c)?;
        out.num_examples = 0;
        Ok(out)
    }
    fn evaluate(&mut self, p: Vec<NpyArray>, c: &Config) -> Result<EvaluateOutput, NotOne2x2> {
        AddOne.evaluate(p, c)
    }
}

#[test]
fn a_fit_over_no_examples_is_refused_by_the_transport() {
    let server = ScriptedServer::start(vec![vec![
        msg(Msg::FitIns(FitIns {
            parameters: params(vec![tensor([0.0; 4])]),
            config: BTreeMap::new(),
        })),
        leave(),
    ]])
    .unwrap();
    fibecfed_flower::run(NoExamples, &options(&server)).unwrap();
    let t = server.finish();
    let Some(Reply::FitRes(f)) = &t[0][0].msg else {
        panic!("{:?}", t[0][0])
    };
    let st = f.status.as_ref().unwrap();
    assert_eq!(st.code, Code::FitNotImplemented as i32);
    assert_eq!(
        st.message,
        "the fit reports 0 examples; FedAvg cannot weight it"
    );
    assert!(decode(f.parameters.as_ref()).is_empty());
}

#[test]
fn a_reconnect_request_is_honoured() {
    let server = ScriptedServer::start(vec![
        vec![msg(Msg::ReconnectIns(ReconnectIns { seconds: 1 }))],
        vec![
            msg(Msg::GetParametersIns(GetParametersIns::default())),
            leave(),
        ],
    ])
    .unwrap();
    let start = Instant::now();
    let summary = fibecfed_flower::run(AddOne, &options(&server)).unwrap();
    // The 1 s asked for, and no waiting on the server (which, like flwr's, keeps the
    // dismissed stream open) beyond the short flush.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(2500),
        "{elapsed:?}"
    );
    assert_eq!((summary.answered, summary.sessions), (3, 2));
    let t = server.finish();
    let Some(Reply::DisconnectRes(d)) = &t[0][0].msg else {
        panic!("{:?}", t[0][0])
    };
    assert_eq!(d.reason, Reason::Reconnect as i32);
    assert!(matches!(t[1][0].msg, Some(Reply::GetParametersRes(_))));
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name),
    )
    .unwrap()
}

#[test]
fn tls_connections_verify_the_server_against_the_given_ca() {
    let tls = Some((fixture("server.pem"), fixture("server.key")));
    let server = ScriptedServer::start_with(
        vec![vec![
            msg(Msg::GetParametersIns(GetParametersIns::default())),
            leave(),
        ]],
        tls.clone(),
    )
    .unwrap();
    let mut o = options(&server);
    o.root_certificates = Some(fixture("ca.pem"));
    o.tls_domain = Some("localhost".into());
    let summary = fibecfed_flower::run(AddOne, &o).unwrap();
    assert_eq!(summary.answered, 2);
    assert!(matches!(
        server.finish()[0][0].msg,
        Some(Reply::GetParametersRes(_))
    ));

    // A CA that did not sign the server's certificate: refused, never trusted.
    let server = ScriptedServer::start_with(vec![vec![leave()]], tls).unwrap();
    let mut o = options(&server);
    o.root_certificates = Some(fixture("server.pem"));
    o.tls_domain = Some("localhost".into());
    let err = fibecfed_flower::run(AddOne, &o).unwrap_err();
    assert!(
        matches!(
            err,
            FlowerError::Certificate {
                name_mismatch: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(err.to_string().contains("--root-certificates"), "{err}");
    assert!(
        server.finish().is_empty(),
        "no stream may reach an untrusted server"
    );
}

#[test]
fn a_certificate_for_another_name_is_reported_with_the_name() {
    let tls = Some((fixture("server.pem"), fixture("server.key")));
    let server = ScriptedServer::start_with(vec![vec![leave()]], tls).unwrap();
    let mut o = options(&server);
    o.root_certificates = Some(fixture("ca.pem"));
    o.tls_domain = Some("flower.example".into());
    o.initial_backoff = Duration::from_secs(2);
    let start = Instant::now();
    let err = fibecfed_flower::run(AddOne, &o).unwrap_err();
    // Refused at the first handshake: no retries (and no 2 s backoff) for a certificate.
    assert!(start.elapsed() < Duration::from_secs(1), "{err}");
    assert!(
        matches!(
            err,
            FlowerError::Certificate {
                name_mismatch: true,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    for part in [
        "not valid for name \"flower.example\"",
        "only valid for DnsName(\"localhost\")",
        "--tls-domain",
    ] {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
    assert!(server.finish().is_empty());
}

#[test]
fn root_certificates_without_a_certificate_are_refused_naming_the_file() {
    let check = fibecfed_flower::check_root_certificates;
    assert_eq!(check(&fixture("ca.pem"), "ca.pem").unwrap(), 1);
    let noise: Vec<u8> = (0..2000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let bad_base64 = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    // Valid base64, not a certificate.
    let not_der = b"-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";
    for (bytes, why) in [
        (&noise[..], "no PEM certificate"),
        (&fixture("server.key")[..], "no PEM certificate"),
        (&bad_base64[..], "certificate 1: bad PEM"),
        (
            &not_der[..],
            "certificate 1 is not a valid X.509 certificate",
        ),
    ] {
        let err = check(bytes, "roots.pem").unwrap_err();
        assert!(matches!(err, FlowerError::Certificates { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("roots.pem") && text.contains(why), "{text}");
    }
    // `run` refuses them before connecting anywhere.
    let mut o = Options::new("127.0.0.1:9");
    o.root_certificates = Some(noise);
    let err = fibecfed_flower::run(AddOne, &o).unwrap_err();
    assert!(matches!(err, FlowerError::Certificates { .. }), "{err}");
}

/// Accepts TCP connections and holds them open without ever writing a byte, until
/// dropped: a frozen server, or a service that is not gRPC.
struct Mute {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Mute {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Mute {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `run` on another thread, failing the test (not hanging it) past `limit`.
fn run_within(o: Options, limit: Duration) -> Result<fibecfed_flower::Summary, FlowerError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fibecfed_flower::run(AddOne, &o));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the client still waits after {limit:?}"))
}

#[test]
fn a_server_that_accepts_but_never_answers_is_reported_after_the_answer_timeout() {
    let mute = Mute::start();
    for tls in [false, true] {
        let mut o = Options::new(mute.addr.to_string());
        o.attempts = 2;
        o.initial_backoff = Duration::from_millis(50);
        o.answer_timeout = Duration::from_secs(1);
        if tls {
            // Silent in the TLS handshake rather than in HTTP/2.
            o.root_certificates = Some(fixture("ca.pem"));
        }
        let start = Instant::now();
        let err = run_within(o, Duration::from_secs(20)).unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(err, FlowerError::Silent { attempts: 2, .. }),
            "tls {tls}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&mute.addr.to_string())
                && text.contains("accepted the connection but did not answer within 1 s"),
            "{text}"
        );
        // Two waits of 1 s and one backoff of 0.05 s; generous above for a slow machine.
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(8),
            "tls {tls}: {took:?}"
        );
    }
}

#[test]
fn a_server_that_ends_every_stream_is_given_up_on() {
    // Three connections, none with an instruction.
    let server = ScriptedServer::start(vec![vec![], vec![], vec![]]).unwrap();
    let err = fibecfed_flower::run(AddOne, &options(&server)).unwrap_err();
    assert!(
        matches!(
            err,
            FlowerError::Refused {
                attempts: 3,
                tls: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--root-certificates"), "{err}");
    assert_eq!(server.finish().len(), 3);
}

#[test]
fn streams_aborted_mid_instruction_are_reconnected_not_given_up_on() {
    // Three rounds whose stream the server aborts while the client answers (flwr's
    // round_timeout), more than `attempts`: each received an instruction, so none
    // counts as a refusal; the fourth session dismisses the client.
    let fit = || {
        msg(Msg::FitIns(FitIns {
            parameters: params(vec![tensor([0.0; 4])]),
            config: BTreeMap::new(),
        }))
    };
    let server =
        ScriptedServer::start_aborting(vec![vec![fit()], vec![fit()], vec![fit()], vec![leave()]])
            .unwrap();
    let summary = fibecfed_flower::run(AddOne, &options(&server)).unwrap();
    assert_eq!(summary.sessions, 4);
    assert_eq!(server.finish().len(), 4);
}

#[test]
fn an_unreachable_server_is_reported_after_the_retries() {
    // A port nothing listens on: bind, note it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = Options::new(format!("127.0.0.1:{port}"));
    o.attempts = 3;
    o.initial_backoff = Duration::from_millis(100);
    let start = Instant::now();
    let err = fibecfed_flower::run(AddOne, &o).unwrap_err();
    // Backoff 0.1 s then 0.2 s between the three attempts.
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(
        matches!(err, FlowerError::Unreachable { attempts: 3, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("cannot reach the Flower server"),
        "{err}"
    );
}

#[test]
fn bad_addresses_are_refused() {
    for bad in ["localhost", "host:port", ":8080", "a b:1"] {
        let err = fibecfed_flower::run(AddOne, &Options::new(bad)).unwrap_err();
        assert!(matches!(err, FlowerError::Address(_)), "{bad}: {err}");
    }
}
