//! A list of breached passwords (`--breached-passwords-file`) that new passwords are checked
//! against, as NIST SP 800-63B asks ("passwords obtained from previous breach corpuses").
//! The bundled common-passwords list holds the 10,000 most used; this one can be Have I Been
//! Pwned's full Pwned Passwords download (about a billion SHA-1 hashes, ~40 GB), which no
//! service should load into memory, so the file is searched where it lies.
//!
//! The format is HIBP's "ordered by hash" one: a line per password, its SHA-1 in hex
//! (either case), optionally `:count`, sorted by hash; LF or CRLF. A lookup is a binary
//! search by byte offset (each probe reads one line at an offset, about 30 probes for the
//! full list, served by the page cache when warm), run on the blocking pool. Only the
//! password's SHA-1 reaches the search; the password itself never leaves the caller.
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The field violation (and CheckPassword problem) for a listed password.
pub const PROBLEM: &str = "appears in a list of passwords exposed in data breaches; choose \
                           another";

/// Longest line considered: a hash, a colon and a count, with room to spare.
const MAX_LINE: usize = 128;
/// Below this span of bytes the search reads lines in order instead of halving.
const SCAN_BELOW: u64 = 4096;

/// An open, checked breached-passwords file.
#[derive(Debug)]
pub struct BreachedList {
    file: File,
    len: u64,
    path: PathBuf,
}

/// An uppercase hex SHA-1.
type HexHash = [u8; 40];

/// The uppercase hex SHA-1 of `password` (UTF-8), as the list holds it.
pub fn sha1_hex(password: &str) -> HexHash {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(password.as_bytes());
    let mut out = [0u8; 40];
    // 20 bytes always fit 40 hex digits.
    let _ = hex::encode_to_slice(digest.as_slice(), &mut out);
    out.make_ascii_uppercase();
    out
}

/// The hash a line starts with, upper-cased; `None` when it does not start with 40 hex digits
/// followed by the end of the line or a colon.
fn line_hash(line: &[u8]) -> Option<HexHash> {
    let head = line.get(..40)?;
    if !matches!(line.get(40), None | Some(b':' | b'\r' | b'\n')) {
        return None;
    }
    let mut out = [0u8; 40];
    for (o, c) in out.iter_mut().zip(head) {
        if !c.is_ascii_hexdigit() {
            return None;
        }
        *o = c.to_ascii_uppercase();
    }
    Some(out)
}

impl BreachedList {
    /// Opens `path` and checks that it looks like a hash list (its first and last lines).
    pub fn open(path: &Path) -> anyhow::Result<BreachedList> {
        let file = File::open(path)
            .with_context(|| format!("opening the breached-passwords file {}", path.display()))?;
        let len = file.metadata()?.len();
        let list = BreachedList {
            file,
            len,
            path: path.to_path_buf(),
        };
        let bad = || {
            anyhow::anyhow!(
                "{} is not a breached-passwords list: each line must be a SHA-1 in hex, \
                 optionally followed by :count, sorted by hash (Have I Been Pwned's \
                 'ordered by hash' download)",
                path.display()
            )
        };
        let first = list.line_at(0)?.and_then(|l| l.hash).ok_or_else(bad)?;
        let last = list.last_hash()?.ok_or_else(bad)?;
        if first > last {
            return Err(bad());
        }
        Ok(list)
    }

    /// The file it reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.len
    }

    /// The hash of the file's last line.
    fn last_hash(&self) -> io::Result<Option<HexHash>> {
        let from = self.len.saturating_sub(2 * MAX_LINE as u64);
        let mut buf = [0u8; 2 * MAX_LINE];
        let n = read_full_at(&self.file, &mut buf, from)?;
        let tail = buf[..n].trim_ascii_end();
        let start = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        Ok(line_hash(&tail[start..]))
    }

    /// The first line starting at or after `pos`: where it starts, where the next starts, and
    /// its hash (`None` for a line that is not a hash line). `None` past the last line.
    fn line_at(&self, pos: u64) -> io::Result<Option<Line>> {
        // Read from one byte before `pos`, so a line starting exactly at `pos` is found.
        let from = pos.saturating_sub(1);
        let mut buf = [0u8; 2 * MAX_LINE];
        let n = read_full_at(&self.file, &mut buf, from)?;
        let buf = &buf[..n];
        let start = if pos == 0 {
            0
        } else {
            match buf.iter().position(|b| *b == b'\n') {
                Some(i) => i + 1,
                None => return Ok(None),
            }
        };
        if start >= buf.len() {
            return Ok(None);
        }
        let rest = &buf[start..];
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        Ok(Some(Line {
            start: from + start as u64,
            next: from + (start + end) as u64,
            hash: line_hash(rest),
        }))
    }

    /// Whether the list holds this uppercase hex SHA-1.
    pub fn contains_hash(&self, target: &HexHash) -> io::Result<bool> {
        // Invariant (the list being sorted): the target's line, if any, starts at or after
        // `lo` and no later than the first line starting at or after `hi`.
        let (mut lo, mut hi) = (0u64, self.len);
        while hi.saturating_sub(lo) > SCAN_BELOW {
            let mid = lo + (hi - lo) / 2;
            match self.line_at(mid)? {
                Some(Line {
                    hash: Some(h),
                    start,
                    ..
                }) if h < *target => lo = start.min(hi),
                _ => hi = mid,
            }
        }
        // Then line by line, up to and including the first line starting at or after `hi`
        // (which bounds the work even on a file that is not sorted after all).
        let mut pos = lo;
        while let Some(line) = self.line_at(pos)? {
            match line.hash {
                Some(h) if h == *target => return Ok(true),
                Some(h) if h > *target => return Ok(false),
                _ => {}
            }
            if line.start >= hi || line.next <= pos {
                break;
            }
            pos = line.next;
        }
        Ok(false)
    }
}

/// One line of the file, located.
#[derive(Debug, Clone, Copy)]
struct Line {
    start: u64,
    next: u64,
    hash: Option<HexHash>,
}

/// Reads as much of `buf` as the file has from `offset`.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn list_of(
        passwords: &[&str],
        crlf: bool,
        lower: bool,
    ) -> (tempfile::NamedTempFile, Vec<String>) {
        let mut hashes: Vec<String> = passwords
            .iter()
            .map(|p| String::from_utf8(sha1_hex(p).to_vec()).unwrap())
            .collect();
        hashes.sort();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for (i, h) in hashes.iter().enumerate() {
            let h = if lower { h.to_lowercase() } else { h.clone() };
            let end = if crlf { "\r\n" } else { "\n" };
            write!(f, "{h}:{}{end}", i * 7 + 1).unwrap();
        }
        f.flush().unwrap();
        (f, hashes)
    }

    #[test]
    fn sha1_is_the_uppercase_hex_hibp_uses() {
        assert_eq!(
            &sha1_hex("password"),
            b"5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8"
        );
    }

    #[test]
    fn every_listed_password_is_found_and_no_other() {
        let listed: Vec<String> = (0..3000).map(|i| format!("breached-{i}")).collect();
        let refs: Vec<&str> = listed.iter().map(String::as_str).collect();
        for (crlf, lower) in [(false, false), (true, false), (false, true)] {
            let (f, _) = list_of(&refs, crlf, lower);
            let list = BreachedList::open(f.path()).unwrap();
            for p in &listed {
                assert!(list.contains_hash(&sha1_hex(p)).unwrap(), "{p} crlf={crlf}");
            }
            for i in 0..3000 {
                let p = format!("never-breached-{i}");
                assert!(!list.contains_hash(&sha1_hex(&p)).unwrap(), "{p}");
            }
            // Before the first and after the last hash.
            assert!(!list.contains_hash(&[b'0'; 40]).unwrap());
            assert!(!list.contains_hash(&[b'F'; 40]).unwrap());
        }
    }

    #[test]
    fn tiny_lists_and_a_missing_final_newline_work() {
        let (f, _) = list_of(&["only-one"], false, false);
        let list = BreachedList::open(f.path()).unwrap();
        assert!(list.contains_hash(&sha1_hex("only-one")).unwrap());
        assert!(!list.contains_hash(&sha1_hex("another")).unwrap());
        let mut both = [sha1_hex_str("a"), sha1_hex_str("b")];
        both.sort();
        let mut g = tempfile::NamedTempFile::new().unwrap();
        write!(g, "{}\n{}", both[0], both[1]).unwrap();
        let list = BreachedList::open(g.path()).unwrap();
        assert!(list.contains_hash(&sha1_hex("a")).unwrap());
        assert!(list.contains_hash(&sha1_hex("b")).unwrap());
    }

    fn sha1_hex_str(p: &str) -> String {
        String::from_utf8(sha1_hex(p).to_vec()).unwrap()
    }

    #[test]
    fn files_that_are_not_hash_lists_are_refused_at_open() {
        for text in [
            "",
            "password\n123456\n",
            "5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8X\n",
        ] {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(text.as_bytes()).unwrap();
            let err = BreachedList::open(f.path()).unwrap_err().to_string();
            assert!(
                err.contains("is not a breached-passwords list"),
                "{text:?}: {err}"
            );
        }
        // Unsorted (the last hash below the first).
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, "{}\n{}\n", "F".repeat(40), "0".repeat(40)).unwrap();
        assert!(BreachedList::open(f.path()).is_err());
        let missing = BreachedList::open(Path::new("/nonexistent/pwned.txt")).unwrap_err();
        assert!(format!("{missing:#}").contains("opening the breached-passwords file"));
    }
}
