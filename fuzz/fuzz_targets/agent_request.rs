//! The agent's request decoding: bytes as tonic hands them to prost, decoded into
//! each `agent.v1` request, then checked by `fsb_agent::request` exactly as the
//! server does before any actor or containerd sees them. Never panics; whatever
//! decodes is either accepted with a well-formed sandbox id or refused with
//! InvalidArgument. The first byte picks the message.
#![no_main]

use fsb_agent::request;
use fsb_core::spec::SpecLimits;
use fsb_proto::agent::v1 as av;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn refused(s: &tonic::Status) {
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
}

fn id_ok(id: &fsb_core::SandboxId) {
    let s = id.as_str();
    assert!(s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let limits = SpecLimits {
        agent_port: Some(5758),
        ..SpecLimits::default()
    };
    match which % 5 {
        0 => {
            if let Ok(req) = av::CreateSandboxRequest::decode(bytes) {
                match request::create(req, &limits) {
                    Ok(c) => {
                        id_ok(&c.id);
                        assert!(c.spec.ports.iter().all(|p| p.get() != 5758));
                    }
                    Err(s) => refused(&s),
                }
            }
        }
        1 => {
            if let Ok(av::ExecRequest {
                msg: Some(av::exec_request::Msg::Start(start)),
            }) = av::ExecRequest::decode(bytes)
            {
                match request::exec_start(start, &limits) {
                    Ok((id, exec)) => {
                        id_ok(&id);
                        assert!(!exec.args.is_empty());
                        assert!(exec.cwd.as_deref().is_none_or(|c| c.starts_with('/')));
                    }
                    Err(s) => refused(&s),
                }
            }
        }
        2 => {
            if let Ok(req) = av::DeleteSandboxRequest::decode(bytes) {
                match request::delete(&req, &limits) {
                    Ok((id, grace)) => {
                        id_ok(&id);
                        assert!(
                            grace
                                .is_none_or(|g| g.as_secs() <= u64::from(limits.max_grace_seconds))
                        );
                    }
                    Err(s) => refused(&s),
                }
            }
        }
        3 => {
            if let Ok(req) = av::LogsRequest::decode(bytes) {
                match request::logs(&req) {
                    Ok(id) => id_ok(&id),
                    Err(s) => refused(&s),
                }
            }
        }
        _ => {
            if let Ok(req) = av::StatsRequest::decode(bytes) {
                match request::stats(&req) {
                    Ok(ids) => ids.iter().for_each(id_ok),
                    Err(s) => refused(&s),
                }
            }
        }
    }
});
