//! `fsb image load|pull|ls`.

use std::{io::Write, path::Path};

use fsb_proto::fastpath::v1::{self as fp, pull_image_progress};
use tokio::io::AsyncReadExt;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::{
    cli::{ImageCommand, OutputFormat},
    client::Conn,
    config::Settings,
    error::{CliError, exit},
    output,
};

/// Largest chunk `Images.Load` accepts.
pub(crate) const LOAD_CHUNK: usize = 1024 * 1024;

/// `fsb image ...`.
pub(crate) async fn image(cmd: &ImageCommand, settings: &Settings) -> Result<u8, CliError> {
    match cmd {
        ImageCommand::Load { file, name, pool } => load(file, name, pool, settings).await,
        ImageCommand::Pull {
            reference,
            username,
            password_stdin,
            pool,
        } => pull(reference, username, *password_stdin, pool, settings).await,
        ImageCommand::Ls { pool } => ls(pool, settings).await,
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageDoc {
    name: String,
    digest: String,
    size_bytes: u64,
    in_use: bool,
}

impl From<&fp::ImageInfo> for ImageDoc {
    fn from(i: &fp::ImageInfo) -> Self {
        Self {
            name: i.name.clone(),
            digest: i.digest.clone(),
            size_bytes: i.size_bytes,
            in_use: i.in_use,
        }
    }
}

fn print_images(format: OutputFormat, images: &[fp::ImageInfo]) -> Result<(), CliError> {
    match format {
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.digest.clone(),
                        human_bytes(i.size_bytes),
                        if i.in_use { "yes" } else { "no" }.to_owned(),
                    ]
                })
                .collect();
            output::print(&output::table(&["NAME", "DIGEST", "SIZE", "IN USE"], &rows));
        }
        f => {
            let docs: Vec<ImageDoc> = images.iter().map(ImageDoc::from).collect();
            output::print(&output::render_doc(f, &docs)?);
        }
    }
    Ok(())
}

/// 1.2 MiB.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The chunks of `Images.Load`: options in the first, then at most 1 MiB of data each.
pub(crate) async fn load_chunks(
    path: std::path::PathBuf,
    name: String,
    pool_ref: String,
    tx: tokio::sync::mpsc::Sender<fp::LoadImageChunk>,
) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(&path).await?;
    let mut first = true;
    loop {
        let mut buf = vec![0u8; LOAD_CHUNK];
        let mut filled = 0;
        // Fill whole chunks (reads may return less) so every chunk but the last is 1 MiB.
        while filled < LOAD_CHUNK {
            let n = file.read(&mut buf[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        if filled == 0 && !first {
            return Ok(());
        }
        let chunk = fp::LoadImageChunk {
            name: if first { name.clone() } else { String::new() },
            pool_ref: if first {
                pool_ref.clone()
            } else {
                String::new()
            },
            data: buf,
        };
        first = false;
        if tx.send(chunk).await.is_err() || filled < LOAD_CHUNK {
            return Ok(());
        }
    }
}

async fn load(
    file: &Path,
    name: &Option<String>,
    pool: &Option<String>,
    settings: &Settings,
) -> Result<u8, CliError> {
    // Fail on a missing file before connecting.
    std::fs::metadata(file)
        .map_err(|e| CliError::Other(anyhow::anyhow!("{}: {e}; check the path", file.display())))?;
    let conn = Conn::connect(settings).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = tokio::spawn(load_chunks(
        file.to_owned(),
        name.clone().unwrap_or_default(),
        pool.clone().unwrap_or_default(),
        tx,
    ));
    let info = conn
        .images()
        .load(ReceiverStream::new(rx))
        .await
        .map_err(CliError::grpc(format!("load {}", file.display())));
    let read = reader.await;
    let info = info?.into_inner();
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(CliError::Other(anyhow::anyhow!("{}: {e}", file.display()))),
        Err(e) => {
            return Err(CliError::Other(anyhow::anyhow!(
                "reading {}: {e}",
                file.display()
            )));
        }
    }
    print_images(settings.output, std::slice::from_ref(&info))?;
    Ok(exit::OK)
}

/// One progress line.
pub(crate) fn progress_line(b: &fp::BlobProgress) -> String {
    let short = b
        .digest
        .strip_prefix("sha256:")
        .unwrap_or(&b.digest)
        .chars()
        .take(12)
        .collect::<String>();
    if b.cached {
        format!("{} {short}: already present", b.kind)
    } else if b.total > 0 {
        format!(
            "{} {short}: {} / {}",
            b.kind,
            human_bytes(b.done),
            human_bytes(b.total)
        )
    } else {
        format!("{} {short}: {}", b.kind, human_bytes(b.done))
    }
}

async fn pull(
    reference: &str,
    username: &Option<String>,
    password_stdin: bool,
    pool: &Option<String>,
    settings: &Settings,
) -> Result<u8, CliError> {
    let password = if password_stdin {
        let mut p = String::new();
        std::io::stdin().read_line(&mut p).map_err(|e| {
            CliError::Other(anyhow::anyhow!("reading the password from stdin: {e}"))
        })?;
        p.trim_end_matches(['\n', '\r']).to_owned()
    } else {
        String::new()
    };
    let conn = Conn::connect(settings).await?;
    let what = format!("pull {reference}");
    let mut stream = conn
        .images()
        .pull(fp::PullImageRequest {
            image: reference.to_owned(),
            pool_ref: pool.clone().unwrap_or_default(),
            username: username.clone().unwrap_or_default(),
            password,
        })
        .await
        .map_err(CliError::grpc(what.clone()))?
        .into_inner();
    let tty = settings.stderr_is_tty;
    let mut err = std::io::stderr();
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(|s| {
            if tty {
                let _ = writeln!(err);
            }
            CliError::grpc(what.clone())(s)
        })?;
        match msg.msg {
            Some(pull_image_progress::Msg::Blob(b)) => {
                if tty {
                    // One line, rewritten in place.
                    let _ = write!(err, "\r\x1b[2K{}", progress_line(&b));
                    let _ = err.flush();
                } else if b.cached || (b.total > 0 && b.done >= b.total) {
                    // Plain output: one line per finished blob, not per update.
                    let _ = writeln!(err, "{}", progress_line(&b));
                }
            }
            Some(pull_image_progress::Msg::Done(info)) => {
                if tty {
                    let _ = writeln!(err);
                }
                print_images(settings.output, std::slice::from_ref(&info))?;
                return Ok(exit::OK);
            }
            None => {}
        }
    }
    Err(CliError::Other(anyhow::anyhow!(
        "{what}: the stream ended before the image was done; see `fsb up`'s log"
    )))
}

async fn ls(pool: &Option<String>, settings: &Settings) -> Result<u8, CliError> {
    let conn = Conn::connect(settings).await?;
    let mut images = conn
        .images()
        .list(fp::ListImagesRequest {
            pool_ref: pool.clone().unwrap_or_default(),
        })
        .await
        .map_err(CliError::grpc("list images"))?
        .into_inner()
        .images;
    images.sort_by(|a, b| a.name.cmp(&b.name));
    print_images(settings.output, &images)?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_humans_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn progress_lines() {
        let b = fp::BlobProgress {
            digest: "sha256:0123456789abcdef".into(),
            kind: "layer".into(),
            done: 1024 * 1024,
            total: 2 * 1024 * 1024,
            cached: false,
        };
        assert_eq!(progress_line(&b), "layer 0123456789ab: 1.0 MiB / 2.0 MiB");
        let cached = fp::BlobProgress { cached: true, ..b };
        assert_eq!(
            progress_line(&cached),
            "layer 0123456789ab: already present"
        );
    }

    #[tokio::test]
    async fn load_sends_options_first_and_1_mib_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("img.tar");
        let data: Vec<u8> = (0..(2 * LOAD_CHUNK + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        load_chunks(path.clone(), "n".into(), "p".into(), tx)
            .await
            .unwrap();
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            (chunks[0].name.as_str(), chunks[0].pool_ref.as_str()),
            ("n", "p")
        );
        assert!(chunks[1].name.is_empty());
        assert_eq!(chunks[0].data.len(), LOAD_CHUNK);
        assert_eq!(chunks[2].data.len(), 10);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(joined, data);
    }
}
