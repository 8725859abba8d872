//! `ls`, `get`, `logs`, `rm`, `update`, `reset`: one call (or one stream) each.

use std::{collections::HashMap, time::SystemTime};

use fsb_proto::fastpath::v1 as fp;

use crate::{
    cli::{
        FailurePolicyArg, GetArgs, LogsArgs, LsArgs, OutputFormat, ResetArgs, RmArgs, UpdateArgs,
    },
    client::Conn,
    commands::run::{copy_logs, timestamp},
    config::Settings,
    error::{CliError, exit},
    output::{self, SandboxDoc, SandboxListDoc, WarmLevelDoc},
};

/// `-l a=b,c=d -l e=f` as one map.
pub(crate) fn parse_selector(items: &[String]) -> Result<HashMap<String, String>, CliError> {
    let mut out = HashMap::new();
    for part in items
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = crate::cli::parse_key_value(part)
            .map_err(|e| CliError::BadConfig(format!("-l: {e}; use -l key=value")))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// `fsb ls`.
pub(crate) async fn ls(args: &LsArgs, settings: &Settings) -> Result<u8, CliError> {
    let namespace = if args.all_namespaces {
        String::new()
    } else {
        settings.namespace(args.ns.namespace.as_deref())
    };
    let req = fp::ListRequest {
        namespace: namespace.clone(),
        pool_ref: args.pool.clone().unwrap_or_default(),
        label_selector: parse_selector(&args.selector)?,
    };
    let conn = Conn::connect(settings).await?;
    let resp = conn
        .fast_path()
        .list(req)
        .await
        .map_err(CliError::grpc(if namespace.is_empty() {
            "list".to_owned()
        } else {
            format!("list {namespace}")
        }))?
        .into_inner();
    let mut list = resp.sandboxes;
    list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    match settings.output {
        OutputFormat::Table => {
            let mut text = output::sandbox_table(&list, SystemTime::now());
            if !resp.warm.is_empty() {
                text.push('\n');
                text.push_str(&output::warm_table(&resp.warm));
            }
            output::print(&text);
        }
        f => output::print(&output::render_doc(
            f,
            &SandboxListDoc {
                api_version: output::API_VERSION,
                kind: "SandboxList",
                items: list.iter().map(SandboxDoc::from).collect(),
                warm: resp.warm.iter().map(WarmLevelDoc::from).collect(),
            },
        )?),
    }
    Ok(exit::OK)
}

/// `fsb get`.
pub(crate) async fn get(args: &GetArgs, settings: &Settings) -> Result<u8, CliError> {
    let namespace = settings.namespace(args.ns.namespace.as_deref());
    let conn = Conn::connect(settings).await?;
    let sb = conn
        .fast_path()
        .get(fp::GetRequest {
            namespace: namespace.clone(),
            name: args.name.clone(),
        })
        .await
        .map_err(CliError::grpc(format!("get {namespace}/{}", args.name)))?
        .into_inner();
    match settings.output {
        OutputFormat::Table => output::print(&output::sandbox_detail(&sb)),
        f => output::print(&output::render_doc(f, &SandboxDoc::from(&sb))?),
    }
    Ok(exit::OK)
}

/// `fsb logs`.
pub(crate) async fn logs(args: &LogsArgs, settings: &Settings) -> Result<u8, CliError> {
    let namespace = settings.namespace(args.ns.namespace.as_deref());
    let conn = Conn::connect(settings).await?;
    let what = format!("logs {namespace}/{}", args.name);
    let stream = conn
        .fast_path()
        .logs(fp::LogsRequest {
            namespace,
            name: args.name.clone(),
            follow: args.follow,
            tail_lines: args.tail.unwrap_or(0),
        })
        .await
        .map_err(CliError::grpc(what.clone()))?
        .into_inner();
    copy_logs(stream).await.map_err(|e| match e {
        CliError::Grpc { status, .. } => CliError::Grpc { what, status },
        e => e,
    })?;
    Ok(exit::OK)
}

/// `fsb rm`: every name is tried; the exit code is the last failure's.
pub(crate) async fn rm(args: &RmArgs, settings: &Settings) -> Result<u8, CliError> {
    let namespace = settings.namespace(args.ns.namespace.as_deref());
    let conn = Conn::connect(settings).await?;
    let mut fast = conn.fast_path();
    let mut last_error = None;
    for name in &args.names {
        let r = fast
            .delete(fp::DeleteRequest {
                namespace: namespace.clone(),
                name: name.clone(),
                grace_period_seconds: args.grace,
            })
            .await;
        match r {
            Ok(_) => output::print(&format!("{name}\n")),
            Err(status) => {
                let e = CliError::grpc(format!("delete {namespace}/{name}"))(status);
                if args.names.len() > 1 {
                    eprintln!("fsb: {e}");
                }
                last_error = Some(e);
            }
        }
    }
    match last_error {
        None => Ok(exit::OK),
        Some(e) if args.names.len() == 1 => Err(e),
        // Already reported line by line.
        Some(e) => Ok(e.exit_code()),
    }
}

/// The UpdateRequest of `fsb update`.
pub(crate) fn update_request(
    args: &UpdateArgs,
    namespace: String,
    now: SystemTime,
) -> fp::UpdateRequest {
    let expire_time = match (args.ttl, args.expire_time) {
        (Some(ttl), _) => Some(timestamp(now + ttl)),
        (None, Some(t)) => Some(timestamp(t)),
        (None, None) => None,
    };
    let labels =
        (!args.labels.is_empty() || !args.remove_labels.is_empty()).then(|| fp::LabelPatch {
            set: args.labels.iter().cloned().collect(),
            remove: args.remove_labels.clone(),
        });
    fp::UpdateRequest {
        namespace,
        name: args.name.clone(),
        expire_time,
        clear_expire_time: args.clear_expiry,
        reset_revision: None,
        failure_policy: args.failure_policy.map(|p| match p {
            FailurePolicyArg::Manual => fp::FailurePolicy::Manual as i32,
            FailurePolicyArg::AutoRecreate => fp::FailurePolicy::AutoRecreate as i32,
        }),
        recovery_timeout_seconds: args.recovery_timeout,
        labels,
    }
}

/// `fsb update`.
pub(crate) async fn update(args: &UpdateArgs, settings: &Settings) -> Result<u8, CliError> {
    let namespace = settings.namespace(args.ns.namespace.as_deref());
    let req = update_request(args, namespace.clone(), SystemTime::now());
    let conn = Conn::connect(settings).await?;
    let sb = conn
        .fast_path()
        .update(req)
        .await
        .map_err(CliError::grpc(format!("update {namespace}/{}", args.name)))?
        .into_inner();
    output::print_sandbox_name_or_doc(settings.output, &sb)?;
    Ok(exit::OK)
}

/// `fsb reset`: Get, then Update with the next reset revision.
pub(crate) async fn reset(args: &ResetArgs, settings: &Settings) -> Result<u8, CliError> {
    let namespace = settings.namespace(args.ns.namespace.as_deref());
    let conn = Conn::connect(settings).await?;
    let mut fast = conn.fast_path();
    let what = format!("reset {namespace}/{}", args.name);
    let current = fast
        .get(fp::GetRequest {
            namespace: namespace.clone(),
            name: args.name.clone(),
        })
        .await
        .map_err(CliError::grpc(what.clone()))?
        .into_inner();
    let next = current.spec.map_or(0, |s| s.reset_revision) + 1;
    let sb = fast
        .update(fp::UpdateRequest {
            namespace,
            name: args.name.clone(),
            reset_revision: Some(next),
            ..Default::default()
        })
        .await
        .map_err(CliError::grpc(what))?
        .into_inner();
    match settings.output {
        OutputFormat::Table => output::print(&format!("{} reset (revision {next})\n", sb.name)),
        f => output::print(&output::render_doc(f, &SandboxDoc::from(&sb))?),
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn update_args(argv: &[&str]) -> UpdateArgs {
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Update(u) => u,
            _ => panic!("not update"),
        }
    }

    #[test]
    fn selectors_split_on_commas_and_repeat() {
        let sel = parse_selector(&["a=1,b=2".into(), "c=3".into()]).unwrap();
        assert_eq!(sel.len(), 3);
        assert_eq!(sel.get("b").map(String::as_str), Some("2"));
        assert!(parse_selector(&["novalue".into()]).is_err());
    }

    #[test]
    fn update_sets_only_what_was_asked() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let req = update_request(
            &update_args(&[
                "fsb",
                "update",
                "web",
                "--ttl",
                "5m",
                "--label",
                "a=b",
                "--remove-label",
                "c",
            ]),
            "default".into(),
            now,
        );
        assert_eq!(req.expire_time.unwrap().seconds, 1300);
        assert!(!req.clear_expire_time);
        assert_eq!(req.reset_revision, None);
        assert_eq!(req.failure_policy, None);
        let labels = req.labels.unwrap();
        assert_eq!(labels.set.get("a").map(String::as_str), Some("b"));
        assert_eq!(labels.remove, ["c"]);

        let req = update_request(
            &update_args(&[
                "fsb",
                "update",
                "web",
                "--clear-expiry",
                "--failure-policy",
                "auto-recreate",
                "--recovery-timeout",
                "30",
            ]),
            "default".into(),
            now,
        );
        assert!(req.clear_expire_time);
        assert!(req.expire_time.is_none());
        assert!(req.labels.is_none());
        assert_eq!(
            req.failure_policy,
            Some(fp::FailurePolicy::AutoRecreate as i32)
        );
        assert_eq!(req.recovery_timeout_seconds, Some(30));

        let req = update_request(
            &update_args(&[
                "fsb",
                "update",
                "web",
                "--expire-time",
                "2030-01-02T03:04:05Z",
            ]),
            "default".into(),
            now,
        );
        assert_eq!(req.expire_time.unwrap().seconds, 1_893_553_445);
    }
}
