//! Reading an OCI image layout packed as a tar archive (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), without unpacking it: one pass over the tar headers records
//! where each file's bytes are, and blobs are then streamed from those offsets.
//!
//! Every structural problem (truncated archive, bad header checksum, missing
//! `index.json`, missing blob) is an [`AgentError::InvalidArgument`] naming it.

use std::{
    collections::HashMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use crate::error::AgentError;

const BLOCK: u64 = 512;

/// Where one regular file's bytes are inside the tar archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Offset of the first data byte.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) size: u64,
}

/// The regular files of a tar archive, by normalized path (no leading `./`).
#[derive(Debug)]
pub(crate) struct ArchiveIndex {
    path: PathBuf,
    entries: HashMap<String, Entry>,
}

impl ArchiveIndex {
    /// Scans the archive's headers (blocking I/O: call from `spawn_blocking`).
    pub(crate) fn scan(path: &Path) -> Result<Self, AgentError> {
        let bad = |why: String| {
            AgentError::InvalidArgument(format!("image archive {}: {why}", path.display()))
        };
        let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                AgentError::NotFound(format!("image archive {}", path.display()))
            }
            _ => bad(format!("cannot open: {e}")),
        })?;
        let len = file
            .metadata()
            .map_err(|e| bad(format!("cannot stat: {e}")))?
            .len();
        let mut entries = HashMap::new();
        let mut pos = 0u64;
        let mut long_name: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut header = [0u8; BLOCK as usize];
        let mut ended = false;
        while pos < len {
            if len - pos < BLOCK {
                return Err(bad(format!("truncated tar header at byte {pos}")));
            }
            file.seek(SeekFrom::Start(pos))
                .and_then(|_| file.read_exact(&mut header))
                .map_err(|e| bad(format!("reading tar header at byte {pos}: {e}")))?;
            if header.iter().all(|&b| b == 0) {
                ended = true;
                break;
            }
            verify_checksum(&header).map_err(|why| bad(format!("{why} at byte {pos}")))?;
            let size = parse_size(&header[124..136])
                .ok_or_else(|| bad(format!("bad size field in tar header at byte {pos}")))?;
            let data = pos + BLOCK;
            let padded = size.div_ceil(BLOCK) * BLOCK;
            if data + size > len {
                return Err(bad(format!(
                    "truncated: entry at byte {pos} needs {size} bytes, the file ends at {len}"
                )));
            }
            let typeflag = header[156];
            match typeflag {
                b'L' => {
                    let raw = read_at(&mut file, data, size)
                        .map_err(|e| bad(format!("reading long name: {e}")))?;
                    long_name = Some(cstr(&raw));
                }
                b'x' => {
                    let raw = read_at(&mut file, data, size)
                        .map_err(|e| bad(format!("reading pax header: {e}")))?;
                    pax_path = pax_path_of(&raw);
                }
                b'0' | 0 | b'7' => {
                    let name = match (pax_path.take(), long_name.take()) {
                        (Some(p), _) => p,
                        (None, Some(l)) => l,
                        (None, None) => ustar_name(&header),
                    };
                    entries.insert(normalize(&name), Entry { offset: data, size });
                }
                _ => {
                    // Directories, links, global pax headers: nothing to index.
                    long_name = None;
                    pax_path = None;
                }
            }
            pos = data + padded;
        }
        if !ended && pos > len {
            return Err(bad("truncated after the last entry".into()));
        }
        if entries.is_empty() {
            return Err(bad("not a tar archive with files".into()));
        }
        Ok(Self {
            path: path.to_owned(),
            entries,
        })
    }

    /// The archive's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The entry at `name`, if any.
    pub(crate) fn get(&self, name: &str) -> Option<Entry> {
        self.entries.get(name).copied()
    }

    /// The entry of blob `digest` (`blobs/<alg>/<hex>`), or InvalidArgument.
    pub(crate) fn blob(&self, digest: &str) -> Result<Entry, AgentError> {
        let (alg, hex) = digest.split_once(':').ok_or_else(|| {
            AgentError::InvalidArgument(format!("bad digest {digest:?} in image archive"))
        })?;
        self.get(&format!("blobs/{alg}/{hex}")).ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "image archive {}: blob {digest} is missing",
                self.path.display()
            ))
        })
    }

    /// Reads a whole (small) entry, e.g. `index.json` or a manifest (blocking I/O).
    pub(crate) fn read_small(&self, entry: Entry, limit: u64) -> Result<Vec<u8>, AgentError> {
        if entry.size > limit {
            return Err(AgentError::InvalidArgument(format!(
                "image archive {}: document of {} bytes exceeds {limit}",
                self.path.display(),
                entry.size
            )));
        }
        let mut file = std::fs::File::open(&self.path).map_err(|e| {
            AgentError::InvalidArgument(format!("image archive {}: {e}", self.path.display()))
        })?;
        read_at(&mut file, entry.offset, entry.size).map_err(|e| {
            AgentError::InvalidArgument(format!("image archive {}: {e}", self.path.display()))
        })
    }
}

fn read_at(file: &mut std::fs::File, offset: u64, size: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX).min(1 << 24)];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut buf)?;
    Ok(buf)
}

fn verify_checksum(header: &[u8; BLOCK as usize]) -> Result<(), &'static str> {
    let stored = parse_octal(&header[148..156]).ok_or("bad tar header checksum field")?;
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum == stored {
        Ok(())
    } else {
        Err("tar header checksum mismatch (corrupt or not a tar archive)")
    }
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let s = std::str::from_utf8(&s).ok()?;
    u64::from_str_radix(s, 8).ok()
}

/// Size field: octal ASCII, or GNU base-256 when the high bit of the first byte is set.
fn parse_size(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => {
            let mut v: u64 = u64::from(first & 0x7f);
            for &b in &field[1..] {
                v = v.checked_mul(256)?.checked_add(u64::from(b))?;
            }
            Some(v)
        }
        _ => parse_octal(field),
    }
}

fn cstr(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn ustar_name(header: &[u8; BLOCK as usize]) -> String {
    let name = cstr(&header[0..100]);
    if &header[257..262] == b"ustar" {
        let prefix = cstr(&header[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// `path=` of a pax extended header (records are `LEN key=value\n`).
fn pax_path_of(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    text.lines().find_map(|line| {
        let (_, kv) = line.split_once(' ')?;
        kv.strip_prefix("path=").map(str::to_owned)
    })
}

fn normalize(name: &str) -> String {
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest;
    }
    n.trim_start_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ustar header + data for `name`.
    fn tar_entry(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn indexes_regular_files() {
        let mut tar = tar_entry("./index.json", b"{}");
        tar.extend(tar_entry("blobs/sha256/ab", b"hello"));
        tar.extend([0u8; 1024]);
        let f = write(&tar);
        let idx = ArchiveIndex::scan(f.path()).unwrap();
        let e = idx.get("index.json").unwrap();
        assert_eq!(idx.read_small(e, 10).unwrap(), b"{}");
        assert_eq!(idx.blob("sha256:ab").unwrap().size, 5);
        assert!(idx.blob("sha256:cd").is_err());
    }

    #[test]
    fn truncated_archives_are_invalid() {
        let mut tar = tar_entry("index.json", &[b'x'; 600]);
        tar.truncate(800);
        let f = write(&tar);
        let err = ArchiveIndex::scan(f.path()).unwrap_err();
        assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_tar() {
        let f = write(&[7u8; 2048]);
        let err = ArchiveIndex::scan(f.path()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn missing_file_is_not_found() {
        let err = ArchiveIndex::scan(Path::new("/nonexistent/x.tar")).unwrap_err();
        assert!(err.is_not_found());
    }

    #[test]
    fn base256_sizes() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[11] = 5;
        assert_eq!(parse_size(&field), Some(5));
        assert_eq!(parse_size(b"00000000012\0"), Some(10));
    }
}
