//! The record types callers see: [`Record`] to append (borrowed parts, no
//! copy until the batch encoder) and [`RecordRef`] read back, whose slices
//! point straight into a read-only map of the segment file.

use crate::batch;

/// A record to append: a value, and optionally a key, headers and a timestamp.
///
/// ```
/// use walq::{Queue, Record};
/// let dir = tempfile::tempdir()?;
/// let queue = Queue::open(dir.path())?;
/// let request = Record::new(b"get balance")
///     .key(b"account-7")
///     .header(b"reply_to", b"replies")
///     .header(b"correlation_id", b"42");
/// let offset = queue.append_record(&request)?;
/// let mut reader = queue.read_from(offset)?;
/// let got = reader.next()?.expect("the record is durable, so visible");
/// assert_eq!(got.header(b"correlation_id"), Some(&b"42"[..]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record<'a> {
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: Vec<(&'a [u8], &'a [u8])>,
    pub(crate) value: &'a [u8],
    pub(crate) timestamp_ms: Option<u64>,
}

impl<'a> Record<'a> {
    /// A record with this value, no key, no headers, timestamped when appended.
    pub fn new(value: &'a [u8]) -> Record<'a> {
        Record { key: None, headers: Vec::new(), value, timestamp_ms: None }
    }

    /// Sets the key (an empty key is distinct from no key).
    pub fn key(mut self, key: &'a [u8]) -> Record<'a> {
        self.key = Some(key);
        self
    }

    /// Adds a header; names may repeat, and order is kept.
    pub fn header(mut self, name: &'a [u8], value: &'a [u8]) -> Record<'a> {
        self.headers.push((name, value));
        self
    }

    /// Sets the timestamp in milliseconds since the Unix epoch (default: the
    /// wall clock when the record is appended).
    pub fn timestamp_ms(mut self, ms: u64) -> Record<'a> {
        self.timestamp_ms = Some(ms);
        self
    }

    /// Bytes this record takes in a batch (an upper bound), as checked
    /// against [`QueueBuilder::max_record_bytes`](crate::QueueBuilder::max_record_bytes).
    pub fn encoded_len(&self) -> usize {
        batch::BatchBuilder::record_len(self.key, &self.headers, self.value)
    }
}

/// A record read from the log. Its key, header and value slices borrow the
/// segment's read-only map: no bytes were copied to produce them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub(crate) offset: u64,
    pub(crate) timestamp_ms: u64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: &'a [u8],
    pub(crate) header_count: u32,
    pub(crate) value: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// The record's offset: its position in the log, starting at 0.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Milliseconds since the Unix epoch, as appended.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// The key, if the record has one.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }

    /// The value.
    pub fn value(&self) -> &'a [u8] {
        self.value
    }

    /// The headers, in the order they were added.
    pub fn headers(&self) -> Headers<'a> {
        Headers { inner: batch::header_pairs(self.headers, self.header_count) }
    }

    /// The value of the first header with this name.
    pub fn header(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Copies the record out of the map, for keeping past the reader's next call.
    pub fn to_owned_record(&self) -> OwnedRecord {
        OwnedRecord {
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(<[u8]>::to_vec),
            headers: self.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
            value: self.value.to_vec(),
        }
    }
}

/// A record copied out of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    /// The record's offset.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The key, if any.
    pub key: Option<Vec<u8>>,
    /// The headers, in order.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The value.
    pub value: Vec<u8>,
}

/// The headers of a [`RecordRef`], as `(name, value)` pairs.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    inner: batch::HeaderIter<'a>,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next()
    }
}
