//! `fibecfed client` without Python: against the crate's scripted Flower server (which
//! can send what a real one never does) and against nothing at all. Wrong tensors get
//! an error reply and the client stays; an unreachable server, a bad client id, a
//! config whose layer selection needs the server, and another client's saved state are
//! refused with messages that say what to do. The real-server run is `flower_e2e.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Output;

use common::{Setup, assert_refused, assert_success, fibecfed, s};
use fibecfed_flower::proto::client_message::Msg as Reply;
use fibecfed_flower::proto::server_message::{
    EvaluateIns, FitIns, GetParametersIns, GetPropertiesIns, Msg, ReconnectIns,
};
use fibecfed_flower::proto::{Code, Parameters, ServerMessage, scalar};
use fibecfed_flower::testing::ScriptedServer;
use fibecfed_flower::{NUMPY_TENSOR_TYPE, NpyArray};

/// Two clients, two rounds, the default learning rate.
fn config(su: &Setup, selector: &str) -> String {
    common::federation_toml(su, 2, 2, 5e-4, selector, "")
}

fn client(su: &Setup, selector: &str, server: &str, extra: &[&str]) -> Output {
    let file = su.root.join("federation.toml");
    fs::write(&file, config(su, selector)).unwrap();
    let mut args = vec![
        "client",
        "--server",
        server,
        "--config",
        s(&file),
        "--connect-attempts",
        "2",
    ];
    args.extend_from_slice(extra);
    fibecfed(&args)
}

fn msg(m: Msg) -> ServerMessage {
    ServerMessage { msg: Some(m) }
}

#[allow(clippy::unnecessary_wraps)] // Parameters fields are optional in proto3.
fn params(tensors: &[NpyArray]) -> Option<Parameters> {
    Some(Parameters {
        tensors: tensors.iter().map(NpyArray::to_bytes).collect(),
        tensor_type: NUMPY_TENSOR_TYPE.into(),
    })
}

fn small(n: usize) -> Vec<NpyArray> {
    vec![NpyArray::new(vec![1, 1], vec![0.5]).unwrap(); n]
}

const FIXED: &str = r#"{ kind = "fixed", layers = [1] }"#;

#[test]
fn wrong_tensors_get_an_error_reply_and_the_client_stays() {
    let su = common::setup(24, 12);
    let server = ScriptedServer::start(vec![vec![
        msg(Msg::GetPropertiesIns(GetPropertiesIns::default())),
        msg(Msg::GetParametersIns(GetParametersIns::default())),
        msg(Msg::FitIns(FitIns {
            parameters: params(&small(2)),
            config: BTreeMap::new(),
        })),
        // Layer 1's four LoRA tensors and the head's two, all of the wrong shape.
        msg(Msg::FitIns(FitIns {
            parameters: params(&small(6)),
            config: BTreeMap::new(),
        })),
        msg(Msg::EvaluateIns(EvaluateIns {
            parameters: params(&small(7)),
            config: BTreeMap::new(),
        })),
        msg(Msg::ReconnectIns(ReconnectIns { seconds: 0 })),
    ]])
    .unwrap();
    let out = client(&su, FIXED, &server.addr.to_string(), &["--client-id", "1"]);
    assert_success(&out);
    let t = server.finish();
    let r: Vec<Reply> = t[0].iter().map(|m| m.msg.clone().unwrap()).collect();
    assert_eq!(r.len(), 6, "{r:?}");
    let Reply::GetPropertiesRes(p) = &r[0] else {
        panic!("{:?}", r[0])
    };
    assert_eq!(
        p.properties["global_layers"].scalar,
        Some(scalar::Scalar::String("1".into()))
    );
    assert_eq!(
        p.properties["tensors"].scalar,
        Some(scalar::Scalar::Uint64(6))
    );
    let Reply::GetParametersRes(g) = &r[1] else {
        panic!("{:?}", r[1])
    };
    let initial = g.parameters.as_ref().unwrap();
    assert_eq!(initial.tensors.len(), 6);
    for b in &initial.tensors {
        let a = NpyArray::from_bytes(b).unwrap();
        assert!(a.data.iter().all(|v| v.is_finite()));
    }
    let status = |reply: &Reply| match reply {
        Reply::FitRes(f) => f.status.clone().unwrap(),
        Reply::EvaluateRes(e) => e.status.clone().unwrap(),
        other => panic!("{other:?}"),
    };
    let count = status(&r[2]);
    assert_eq!(count.code, Code::FitNotImplemented as i32);
    assert!(
        count
            .message
            .contains("sent 2 tensors; this client shares 6"),
        "{}",
        count.message
    );
    let shape = status(&r[3]);
    assert_eq!(shape.code, Code::FitNotImplemented as i32);
    assert!(
        shape.message.contains("sent shape [1, 1], the model has"),
        "{}",
        shape.message
    );
    let eval = status(&r[4]);
    assert_eq!(eval.code, Code::EvaluateNotImplemented as i32);
    assert!(eval.message.contains("sent 7 tensors"), "{}", eval.message);
    assert!(matches!(r[5], Reply::DisconnectRes(_)));
}

#[test]
fn an_unreachable_server_is_a_clear_error_after_retries() {
    let su = common::setup(24, 12);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = client(
        &su,
        FIXED,
        &format!("127.0.0.1:{port}"),
        &["--client-id", "0"],
    );
    assert_refused(
        &out,
        &["cannot reach the Flower server", "after 2 attempts"],
    );
}

#[test]
fn bad_setups_are_refused_before_connecting() {
    let su = common::setup(24, 12);
    // Nothing listens here; each case must fail before trying.
    let nowhere = "127.0.0.1:9";
    assert_refused(
        &client(&su, FIXED, nowhere, &["--client-id", "2"]),
        &["--client-id 2 is out of range", "federation.clients = 2"],
    );
    assert_refused(
        &client(
            &su,
            r#"{ kind = "consensus_top_k", fraction = 0.5 }"#,
            nowhere,
            &["--client-id", "0"],
        ),
        &["stock Flower server", "kind = \"fixed\""],
    );
    assert_refused(
        &client(
            &su,
            r#"{ kind = "fixed", layers = [7] }"#,
            nowhere,
            &["--client-id", "0"],
        ),
        &["layer 7 does not exist"],
    );
    assert_refused(
        &client(&su, FIXED, "no-port", &["--client-id", "0"]),
        &["bad server address"],
    );
}

#[test]
fn a_saved_state_is_refused_by_another_client_or_config() {
    let su = common::setup(24, 12);
    // Client 0 trains one round against the scripted server and saves its state.
    let state = su.root.join("state");
    let server = ScriptedServer::start(vec![vec![
        msg(Msg::GetParametersIns(GetParametersIns::default())),
        msg(Msg::ReconnectIns(ReconnectIns { seconds: 0 })),
    ]])
    .unwrap();
    let out = client(&su, FIXED, &server.addr.to_string(), &["--client-id", "0"]);
    assert_success(&out);
    let t = server.finish();
    let Some(Reply::GetParametersRes(g)) = &t[0][0].msg else {
        panic!("{:?}", t[0][0])
    };
    let initial = g.parameters.clone();
    let server = ScriptedServer::start(vec![vec![
        msg(Msg::FitIns(FitIns {
            parameters: initial,
            config: BTreeMap::new(),
        })),
        msg(Msg::ReconnectIns(ReconnectIns { seconds: 0 })),
    ]])
    .unwrap();
    let addr = server.addr.to_string();
    let out = client(
        &su,
        FIXED,
        &addr,
        &["--client-id", "0", "--state-dir", s(&state)],
    );
    assert_success(&out);
    let t = server.finish();
    let Some(Reply::FitRes(f)) = &t[0][0].msg else {
        panic!("{:?}", t[0][0])
    };
    assert_eq!(f.status.as_ref().unwrap().code, Code::Ok as i32);
    assert!(Path::new(&state).join("client-state.safetensors").exists());

    assert_refused(
        &client(
            &su,
            FIXED,
            "127.0.0.1:9",
            &["--client-id", "1", "--state-dir", s(&state)],
        ),
        &["belongs to client 0, not --client-id 1"],
    );
    assert_refused(
        &client(
            &su,
            r#"{ kind = "fixed", layers = [0] }"#,
            "127.0.0.1:9",
            &["--client-id", "0", "--state-dir", s(&state)],
        ),
        &["saved with another config"],
    );
}
