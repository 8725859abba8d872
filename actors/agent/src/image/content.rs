//! containerd's content store, client side: streamed writes checked against the
//! expected digest and size (by us while streaming and by containerd on commit),
//! verified reads, and label updates (the GC reference labels).

use std::{collections::HashMap, time::Duration};

use containerd_client::services::v1::{
    AbortRequest, Info, InfoRequest, ReadContentRequest, UpdateRequest, WriteAction,
    WriteContentRequest, WriteContentResponse, content_client::ContentClient,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;

use super::oci::{Descriptor, sha256_digest};
use crate::{containerd::Containerd, error::AgentError};

/// Largest message we send in one Write (containerd's gRPC limit is 16 MiB).
pub(crate) const CHUNK: usize = 1 << 20;
/// Deadline of a whole blob write stream (each message also has the call deadline).
const STREAM_DEADLINE: Duration = Duration::from_secs(3600);

/// Information about a blob, or None if containerd does not have it.
pub(crate) async fn info(ctrd: &Containerd, digest: &str) -> Result<Option<Info>, AgentError> {
    let req = ctrd.request(InfoRequest {
        digest: digest.to_owned(),
    });
    match ctrd
        .call("content info", ContentClient::new(ctrd.channel()).info(req))
        .await
    {
        Ok(resp) => Ok(resp.info),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a whole blob and checks its digest.
pub(crate) async fn read(ctrd: &Containerd, digest: &str) -> Result<Vec<u8>, AgentError> {
    let req = ctrd.request(ReadContentRequest {
        digest: digest.to_owned(),
        offset: 0,
        size: 0,
    });
    let mut stream = ctrd
        .call("read content", ContentClient::new(ctrd.channel()).read(req))
        .await
        .map_err(|e| {
            if e.is_not_found() {
                AgentError::NotFound(format!("content {digest}"))
            } else {
                e
            }
        })?;
    let mut data = Vec::new();
    loop {
        let next = tokio::time::timeout(ctrd.config().call_timeout, stream.message()).await;
        match next {
            Ok(Ok(Some(chunk))) => data.extend_from_slice(&chunk.data),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(AgentError::containerd("read content", status)),
            Err(_) => {
                return Err(AgentError::Timeout {
                    op: "read content",
                    secs: ctrd.config().call_timeout.as_secs(),
                });
            }
        }
    }
    let actual = sha256_digest(&data);
    if actual != digest {
        return Err(AgentError::Internal(format!(
            "content {digest} reads back as {actual}"
        )));
    }
    Ok(data)
}

/// Sets `labels` on blob `digest`, touching only those keys (others stay).
pub(crate) async fn set_labels(
    ctrd: &Containerd,
    digest: &str,
    labels: HashMap<String, String>,
) -> Result<(), AgentError> {
    if labels.is_empty() {
        return Ok(());
    }
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    let req = ctrd.request(UpdateRequest {
        info: Some(Info {
            digest: digest.to_owned(),
            labels,
            ..Info::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
    });
    ctrd.call(
        "update content labels",
        ContentClient::new(ctrd.channel()).update(req),
    )
    .await
    .map(|_| ())
}

/// Sets those of `labels` that blob `digest` does not carry yet.
pub(crate) async fn ensure_labels(
    ctrd: &Containerd,
    digest: &str,
    labels: &HashMap<String, String>,
) -> Result<(), AgentError> {
    if labels.is_empty() {
        return Ok(());
    }
    let current = info(ctrd, digest)
        .await?
        .map(|i| i.labels)
        .unwrap_or_default();
    let missing: HashMap<String, String> = labels
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    set_labels(ctrd, digest, missing).await
}

/// What opening a write found.
#[derive(Debug)]
pub(crate) enum Opened {
    /// containerd already has the blob (and, under a lease, now also leases it).
    Exists,
    /// A writer to stream the blob into.
    Writer(Box<BlobWriter>),
}

/// One blob being written: `write` chunks, then `commit`. Our own sha256 runs
/// alongside, so a mismatch is reported as the source's fault before containerd's
/// commit check.
#[derive(Debug)]
pub(crate) struct BlobWriter {
    ctrd: Containerd,
    tx: mpsc::Sender<WriteContentRequest>,
    responses: Streaming<WriteContentResponse>,
    reference: String,
    expected: Descriptor,
    offset: i64,
    hasher: Sha256,
}

impl BlobWriter {
    /// Starts writing `desc` under `lease`. Returns [`Opened::Exists`] when the blob is
    /// already in the store (containerd adds it to the lease then).
    pub(crate) async fn open(
        ctrd: &Containerd,
        lease: &str,
        desc: &Descriptor,
        unique: &str,
    ) -> Result<Opened, AgentError> {
        let reference = format!("fsb-{unique}-{}", desc.digest);
        let (tx, rx) = mpsc::channel(2);
        let first = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.clone(),
            total: desc.size,
            expected: desc.digest.clone(),
            ..WriteContentRequest::default()
        };
        tx.send(first)
            .await
            .map_err(|_| AgentError::Internal("content write channel closed".into()))?;
        let mut req = ctrd.leased_request(ReceiverStream::new(rx), lease)?;
        req.set_timeout(STREAM_DEADLINE);
        let opened = ctrd
            .call(
                "write content",
                ContentClient::new(ctrd.channel()).write(req),
            )
            .await;
        let responses = match opened {
            Ok(r) => r,
            Err(e) if e.is_already_exists() => return Ok(Opened::Exists),
            Err(e) => return Err(e),
        };
        let mut writer = Self {
            ctrd: ctrd.clone(),
            tx,
            responses,
            reference,
            expected: desc.clone(),
            offset: 0,
            hasher: Sha256::new(),
        };
        match writer.response("write content").await {
            Ok(stat) => {
                if stat.offset != 0 && stat.offset == desc.size {
                    // containerd already holds these bytes (another namespace, or a
                    // blob its metadata had dropped): committing our ref records them
                    // here without sending them again.
                    let msg = WriteContentRequest {
                        action: WriteAction::Commit as i32,
                        r#ref: writer.reference.clone(),
                        total: desc.size,
                        expected: desc.digest.clone(),
                        offset: desc.size,
                        ..WriteContentRequest::default()
                    };
                    writer.send(msg).await?;
                    return match writer.response("commit shared content").await {
                        Ok(_) => Ok(Opened::Exists),
                        Err(e) if e.is_already_exists() => Ok(Opened::Exists),
                        Err(e) => {
                            writer.abort().await;
                            Err(e)
                        }
                    };
                }
                if stat.offset != 0 {
                    writer.abort().await;
                    // A concurrent load or pull of the same blob can make containerd
                    // report the finished content on our fresh ref; if the blob is in
                    // the store now, it is there for us too.
                    if info(ctrd, &desc.digest).await?.is_some() {
                        return Ok(Opened::Exists);
                    }
                    // Otherwise a fresh ref never has data; refuse to trust it.
                    return Err(AgentError::Internal(format!(
                        "content ingest {} unexpectedly at offset {}",
                        writer.reference, stat.offset
                    )));
                }
                Ok(Opened::Writer(Box::new(writer)))
            }
            Err(e) if e.is_already_exists() => Ok(Opened::Exists),
            Err(e) => Err(e),
        }
    }

    /// Bytes written so far.
    pub(crate) fn offset(&self) -> u64 {
        u64::try_from(self.offset).unwrap_or(0)
    }

    /// Streams `data` (at most [`CHUNK`] bytes) to containerd.
    pub(crate) async fn write(&mut self, data: Vec<u8>) -> Result<(), AgentError> {
        let len = i64::try_from(data.len()).unwrap_or(i64::MAX);
        if self.offset + len > self.expected.size {
            return Err(AgentError::InvalidArgument(format!(
                "blob {} is longer than its declared {} bytes",
                self.expected.digest, self.expected.size
            )));
        }
        self.hasher.update(&data);
        let msg = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.reference.clone(),
            total: self.expected.size,
            expected: self.expected.digest.clone(),
            offset: self.offset,
            data,
            labels: HashMap::new(),
        };
        self.send(msg).await?;
        let resp = self.response("write content").await?;
        self.offset += len;
        if resp.offset != self.offset {
            return Err(AgentError::Internal(format!(
                "content ingest {} at offset {} after writing up to {}",
                self.reference, resp.offset, self.offset
            )));
        }
        Ok(())
    }

    /// Checks size and digest, then commits with `labels`. A blob someone else
    /// committed meanwhile counts as success.
    pub(crate) async fn commit(
        mut self,
        labels: HashMap<String, String>,
    ) -> Result<(), AgentError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if self.offset != self.expected.size {
            self.abort().await;
            return Err(AgentError::InvalidArgument(format!(
                "blob {} is truncated: {} of {} bytes",
                self.expected.digest, self.offset, self.expected.size
            )));
        }
        if actual != self.expected.digest {
            self.abort().await;
            return Err(AgentError::InvalidArgument(format!(
                "blob {} does not match its digest (content hashes to {actual})",
                self.expected.digest
            )));
        }
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.reference.clone(),
            total: self.expected.size,
            expected: self.expected.digest.clone(),
            offset: self.offset,
            data: Vec::new(),
            labels,
        };
        self.send(msg).await?;
        match self.response("commit content").await {
            Ok(_) => Ok(()),
            Err(e) if e.is_already_exists() => Ok(()),
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Gives up: closes the stream and asks containerd to drop the ingest.
    pub(crate) async fn abort(&mut self) {
        let (closed, _) = mpsc::channel(1);
        self.tx = closed;
        let req = self.ctrd.request(AbortRequest {
            r#ref: self.reference.clone(),
        });
        let aborted = self
            .ctrd
            .call(
                "abort content write",
                ContentClient::new(self.ctrd.channel()).abort(req),
            )
            .await;
        if let Err(e) = aborted
            && !e.is_not_found()
        {
            tracing::warn!(reference = %self.reference, error = %e, "aborting content write");
        }
    }

    async fn send(&mut self, msg: WriteContentRequest) -> Result<(), AgentError> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| AgentError::Internal("content write stream closed".into()))
    }

    async fn response(&mut self, op: &'static str) -> Result<WriteContentResponse, AgentError> {
        let timeout = self.ctrd.config().call_timeout;
        match tokio::time::timeout(timeout, self.responses.message()).await {
            Ok(Ok(Some(resp))) => Ok(resp),
            Ok(Ok(None)) => Err(AgentError::Internal(format!(
                "{op}: containerd closed the stream"
            ))),
            Ok(Err(status)) => Err(AgentError::containerd(op, status)),
            Err(_) => Err(AgentError::Timeout {
                op,
                secs: timeout.as_secs(),
            }),
        }
    }
}
