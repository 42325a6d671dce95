//! Finding and decompressing the kernel payload inside a bzImage, and decompressing
//! kernel modules (`.ko.xz`, `.ko.zst`).

use std::io::Read;

use crate::{ImageError, Progress};

/// xz stream header magic (Debian 6.1 kernels).
pub const XZ_MAGIC: &[u8] = &[0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00];
/// zstd frame magic (Debian 6.12 kernels).
pub const ZSTD_MAGIC: &[u8] = &[0x28, 0xB5, 0x2F, 0xFD];
const ELF_MAGIC: &[u8] = b"\x7fELF";
/// Refuse to inflate beyond this; a real vmlinux is ~60–80 MB.
const MAX_OUTPUT: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Xz,
    Zstd,
}

/// All offsets where a known compression magic starts, in file order.
pub fn find_payloads(data: &[u8]) -> Vec<(usize, Codec)> {
    let mut hits = Vec::new();
    for (i, w) in data
        .windows(XZ_MAGIC.len().max(ZSTD_MAGIC.len()))
        .enumerate()
    {
        if w.starts_with(XZ_MAGIC) {
            hits.push((i, Codec::Xz));
        } else if w.starts_with(ZSTD_MAGIC) {
            hits.push((i, Codec::Zstd));
        }
    }
    // `windows` stops before the last few bytes; a magic there could not hold a payload anyway.
    hits
}

/// Extracts the uncompressed ELF kernel from a bzImage: tries every magic hit (a hit may
/// be a coincidence inside code) until one decompresses to something starting with `\x7fELF`.
pub fn extract_vmlinux(bzimage: &[u8], progress: &dyn Progress) -> Result<Vec<u8>, ImageError> {
    let hits = find_payloads(bzimage);
    if hits.is_empty() {
        return Err(ImageError::NoKernelPayload);
    }
    let mut last_err = String::new();
    for (offset, codec) in hits {
        tracing::debug!(offset, ?codec, "trying kernel payload candidate");
        match decompress_stream(&bzimage[offset..], codec, Some(progress)) {
            Ok(out) if out.starts_with(ELF_MAGIC) => {
                tracing::info!(offset, ?codec, size = out.len(), "extracted vmlinux");
                return Ok(out);
            }
            Ok(_) => last_err = format!("payload at {offset} is not an ELF image"),
            Err(e) => last_err = format!("payload at {offset}: {e}"),
        }
    }
    Err(ImageError::Decompress(last_err))
}

/// Decompresses one stream/frame starting at `input[0]`; bytes after its end are ignored
/// (the bzImage appends a size trailer and padding).
pub fn decompress_stream(
    input: &[u8],
    codec: Codec,
    progress: Option<&dyn Progress>,
) -> Result<Vec<u8>, ImageError> {
    match codec {
        Codec::Xz => decompress_xz(input, progress),
        Codec::Zstd => decompress_zstd(input, progress),
    }
}

fn decompress_xz(input: &[u8], progress: Option<&dyn Progress>) -> Result<Vec<u8>, ImageError> {
    use xz2::stream::{Action, Status, Stream};
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0)
        .map_err(|e| ImageError::Decompress(format!("xz init: {e}")))?;
    let total = input.len() as u64;
    let mut out: Vec<u8> = Vec::with_capacity(input.len().saturating_mul(4).min(MAX_OUTPUT));
    let mut last_report = 0u64;
    loop {
        if out.len() >= MAX_OUTPUT {
            return Err(ImageError::Decompress("xz output exceeds 1 GiB".into()));
        }
        if out.capacity() - out.len() < (1 << 20) {
            out.reserve(8 << 20);
        }
        let consumed = usize::try_from(stream.total_in()).unwrap_or(usize::MAX);
        let rest = input.get(consumed..).unwrap_or(&[]);
        let (in_before, out_before) = (stream.total_in(), out.len());
        let action = if rest.is_empty() {
            Action::Finish
        } else {
            Action::Run
        };
        let status = stream
            .process_vec(rest, &mut out, action)
            .map_err(|e| ImageError::Decompress(format!("xz: {e}")))?;
        if let Some(p) = progress
            && stream.total_in() - last_report > (256 << 10)
        {
            last_report = stream.total_in();
            p.bytes(last_report, Some(total));
        }
        match status {
            Status::StreamEnd => break,
            Status::Ok | Status::GetCheck => {}
            Status::MemNeeded => return Err(ImageError::Decompress("xz: memory limit".into())),
        }
        if stream.total_in() == in_before && out.len() == out_before {
            return Err(ImageError::Decompress("xz stream truncated".into()));
        }
    }
    if let Some(p) = progress {
        p.bytes(stream.total_in(), Some(total));
    }
    Ok(out)
}

fn decompress_zstd(input: &[u8], progress: Option<&dyn Progress>) -> Result<Vec<u8>, ImageError> {
    let total = input.len() as u64;
    let mut reader = CountingReader {
        inner: input,
        count: 0,
    };
    let mut out = Vec::new();
    {
        let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut reader)
            .map_err(|e| ImageError::Decompress(format!("zstd header: {e}")))?;
        // Read in chunks so progress can be reported; one frame only, so trailing garbage
        // after the frame is never read.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = dec
                .read(&mut buf)
                .map_err(|e| ImageError::Decompress(format!("zstd: {e}")))?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.len() > MAX_OUTPUT {
                return Err(ImageError::Decompress("zstd output exceeds 1 GiB".into()));
            }
            if let Some(p) = progress {
                p.bytes(dec.get_ref().count, Some(total));
            }
        }
    }
    Ok(out)
}

struct CountingReader<'a> {
    inner: &'a [u8],
    count: u64,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Decompresses a module file according to its extension; plain `.ko` is returned as is.
pub fn module_bytes(file_name: &str, data: Vec<u8>) -> Result<Vec<u8>, ImageError> {
    if file_name.ends_with(".ko.xz") {
        decompress_stream(&data, Codec::Xz, None)
    } else if file_name.ends_with(".ko.zst") {
        decompress_stream(&data, Codec::Zstd, None)
    } else if file_name.ends_with(".ko") {
        Ok(data)
    } else {
        Err(ImageError::Decompress(format!(
            "unsupported module compression: {file_name}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoProgress;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        // Compressible but not trivially constant.
        v.extend((0..len).map(|i| (i % 251) as u8 ^ (i / 4096) as u8));
        v
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn finds_magics_at_their_offsets() {
        let mut img = vec![0u8; 100];
        img[10..16].copy_from_slice(XZ_MAGIC);
        img[50..54].copy_from_slice(ZSTD_MAGIC);
        assert_eq!(
            find_payloads(&img),
            vec![(10, Codec::Xz), (50, Codec::Zstd)]
        );
        assert!(find_payloads(&[0u8; 3]).is_empty());
    }

    #[test]
    fn extracts_xz_payload_with_garbage_and_decoy_magic() {
        let elf = fake_elf(300_000);
        let mut bz = b"MZ fake setup header".to_vec();
        // A decoy: magic followed by junk must be skipped, not fatal.
        bz.extend_from_slice(XZ_MAGIC);
        bz.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        bz.extend_from_slice(&xz(&elf));
        // The bzImage appends the uncompressed size and padding after the stream.
        bz.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        bz.extend_from_slice(&[0xAA; 37]);
        let out = extract_vmlinux(&bz, &NoProgress).unwrap();
        assert_eq!(out, elf);
    }

    #[test]
    fn rejects_non_elf_payload_and_missing_payload() {
        let mut bz = vec![0u8; 16];
        bz.extend_from_slice(&xz(b"not an elf file at all"));
        assert!(matches!(
            extract_vmlinux(&bz, &NoProgress),
            Err(ImageError::Decompress(_))
        ));
        assert!(matches!(
            extract_vmlinux(&[0u8; 64], &NoProgress),
            Err(ImageError::NoKernelPayload)
        ));
    }

    #[test]
    fn truncated_xz_is_an_error() {
        let c = xz(&fake_elf(100_000));
        let r = decompress_stream(&c[..c.len() / 2], Codec::Xz, None);
        assert!(r.is_err());
    }

    #[test]
    fn extracts_zstd_payload_made_by_cli() {
        let elf = fake_elf(200_000);
        // Debian's zstd makes the frame: scripts/setup.sh installs it (test tools).
        let mut child = Command::new("zstd")
            .args(["-q", "-c", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run zstd ({e}): scripts/setup.sh installs it"));
        child.stdin.take().unwrap().write_all(&elf).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let mut bz = vec![0x55u8; 33];
        bz.extend_from_slice(&out.stdout);
        bz.extend_from_slice(&[0xAB; 20]);
        assert_eq!(extract_vmlinux(&bz, &NoProgress).unwrap(), elf);
    }

    #[test]
    fn module_decompression_by_extension() {
        let ko = fake_elf(5000);
        assert_eq!(module_bytes("a.ko.xz", xz(&ko)).unwrap(), ko);
        assert_eq!(module_bytes("a.ko", ko.clone()).unwrap(), ko);
        assert!(module_bytes("a.ko.gz", ko).is_err());
    }
}
