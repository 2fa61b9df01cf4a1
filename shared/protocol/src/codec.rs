//! A tiny strict binary reader/writer used by every Millrace format.
//!
//! Every length is explicit, every read is bounds-checked, and `Reader::finish` refuses trailing
//! bytes, so truncated and padded objects are both rejected instead of half-parsed.

use crate::error::FormatError;

#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(capacity),
        }
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// A string of at most 255 bytes, length-prefixed with one byte.
    pub(crate) fn short_str(&mut self, v: &str) -> Result<(), FormatError> {
        let len = u8::try_from(v.len())
            .map_err(|_| FormatError::Invalid(format!("string {v:?} is longer than 255 bytes")))?;
        self.u8(len);
        self.raw(v.as_bytes());
        Ok(())
    }
    /// Bytes length-prefixed with four bytes.
    pub(crate) fn bytes(&mut self, v: &[u8]) -> Result<(), FormatError> {
        let len = u32::try_from(v.len())
            .map_err(|_| FormatError::Invalid("field longer than 4 GiB".to_string()))?;
        self.u32(len);
        self.raw(v);
        Ok(())
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| FormatError::Truncated {
                what: what.to_string(),
                offset: self.pos,
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    pub(crate) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn i64(&mut self, what: &str) -> Result<i64, FormatError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn short_str(&mut self, what: &str) -> Result<String, FormatError> {
        let len = self.u8(what)? as usize;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| FormatError::Invalid(format!("{what} is not UTF-8")))
    }
    pub(crate) fn bytes(&mut self, what: &str) -> Result<&'a [u8], FormatError> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }
    /// A count of items that each take at least `min_item_len` bytes: refuses counts the remaining
    /// bytes cannot hold, so a corrupted count cannot make us allocate gigabytes.
    pub(crate) fn count(&mut self, what: &str, min_item_len: usize) -> Result<usize, FormatError> {
        let n = self.u32(what)? as usize;
        let remaining = self.buf.len() - self.pos;
        if n.saturating_mul(min_item_len.max(1)) > remaining {
            return Err(FormatError::Truncated {
                what: format!("{what} ({n} items)"),
                offset: self.pos,
            });
        }
        Ok(n)
    }
    pub(crate) fn position(&self) -> usize {
        self.pos
    }
    pub(crate) fn finish(self, what: &str) -> Result<(), FormatError> {
        if self.pos != self.buf.len() {
            return Err(FormatError::TrailingBytes {
                what: what.to_string(),
                count: self.buf.len() - self.pos,
            });
        }
        Ok(())
    }
}
