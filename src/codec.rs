//! How a generation holds its entity bodies: zstd-compressed with a
//! dictionary trained on the generation itself.
//!
//! Catalog entities repeat one another (keys, annotations, relation types,
//! refs): one 1.4 KB body compresses to about a fifth with a dictionary, and
//! the bodies were most of a large mirror's memory. `Index::build` packs
//! every body of a generation with one [`BodyCodec`]: the previous
//! generation's when it still packs most of the bodies, else one trained on
//! this generation (so a generation holds one codec, however many syncs came
//! before it, and a sync does not pay for training); reads unpack
//! (a few microseconds, one allocation of the exact size). Packing is
//! lossless — a body read back is byte for byte what the upstream sent — and
//! a body that does not shrink is kept as it is. Small generations (the
//! by-refs filter's one-entity index) are not packed at all.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict};

/// Generations with fewer entities keep their bodies as they are: too few
/// samples to train a dictionary, and too little memory to matter.
pub const PACK_MIN_ENTITIES: usize = 1024;

/// Size of the trained dictionary: large enough for a catalog's repeated
/// structure; held once per codec.
const DICTIONARY_BYTES: usize = 64 * 1024;

/// How many bodies (at most) the dictionary is trained on, taken evenly
/// across the generation.
const TRAINING_SAMPLES: usize = 4096;

/// zstd level the bodies are packed at (unpacking speed does not depend on
/// it; packing time does, and it is spent once per body per generation).
const LEVEL: i32 = 3;

/// A generation's dictionary, ready to pack and unpack with.
pub struct BodyCodec {
    cdict: CDict<'static>,
    ddict: DDict<'static>,
    dictionary_bytes: usize,
}

impl std::fmt::Debug for BodyCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyCodec")
            .field("dictionary_bytes", &self.dictionary_bytes)
            .finish()
    }
}

thread_local! {
    // One context per thread, reused: creating one allocates about 100 KB.
    static UNPACKER: RefCell<DCtx<'static>> = RefCell::new(DCtx::create());
    static PACKER: RefCell<CCtx<'static>> = RefCell::new(CCtx::create());
}

impl BodyCodec {
    /// Trains a codec on `bodies`, or `None` when there are too few of them
    /// or zstd cannot build a dictionary from them (the bodies are then kept
    /// as they are).
    pub fn train(bodies: &[&[u8]]) -> Option<Arc<BodyCodec>> {
        if bodies.len() < PACK_MIN_ENTITIES {
            return None;
        }
        let step = bodies.len().div_ceil(TRAINING_SAMPLES).max(1);
        let samples: Vec<&[u8]> = bodies.iter().step_by(step).copied().collect();
        let dictionary = zstd::dict::from_samples(&samples, DICTIONARY_BYTES).ok()?;
        Some(Arc::new(BodyCodec {
            cdict: CDict::try_create(&dictionary, LEVEL)?,
            ddict: DDict::try_create(&dictionary)?,
            dictionary_bytes: dictionary.len(),
        }))
    }

    /// Bytes the codec itself holds (the dictionary, once for packing and
    /// once for unpacking, with zstd's tables).
    pub fn heap_bytes(&self) -> usize {
        self.cdict.sizeof() + self.ddict.sizeof()
    }

    /// `body` packed, or `None` when packing would not make it smaller.
    fn pack(&self, body: &[u8]) -> Option<Box<[u8]>> {
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(body.len()));
        PACKER
            .with(|cctx| {
                cctx.borrow_mut()
                    .compress_using_cdict(&mut out, body, &self.cdict)
            })
            .ok()?;
        (out.len() < body.len()).then(|| out.into_boxed_slice())
    }

    /// Unpacks what `pack` made of a `len`-byte body.
    fn unpack(&self, packed: &[u8], len: usize) -> Bytes {
        let mut out = Vec::with_capacity(len);
        let unpacked = UNPACKER.with(|dctx| {
            dctx.borrow_mut()
                .decompress_using_ddict(&mut out, packed, &self.ddict)
        });
        // Only this module packs, with this dictionary, into memory nobody
        // else writes: failing here would mean the process's memory is
        // corrupt, and answering with anything but the stored body is worse
        // than failing the one request (the panic layer turns it into a 500).
        assert!(
            matches!(unpacked, Ok(n) if n == len),
            "a packed entity body did not unpack to its length"
        );
        Bytes::from(out)
    }
}

/// An entity body: as sent, or packed by a generation's codec.
#[derive(Clone)]
pub enum Body {
    /// The bytes themselves.
    Plain(Bytes),
    /// Packed by `codec`; `len` bytes when unpacked.
    Packed {
        /// The generation's codec.
        codec: Arc<BodyCodec>,
        /// Length of the body unpacked.
        len: u32,
        /// The zstd frame.
        data: Box<[u8]>,
    },
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Plain(b) => f.debug_tuple("Plain").field(b).finish(),
            Body::Packed { len, data, .. } => f
                .debug_struct("Packed")
                .field("len", len)
                .field("packed", &data.len())
                .finish(),
        }
    }
}

impl Body {
    /// `plain` packed with `codec`, or kept as it is when that would not
    /// save memory.
    pub fn pack(plain: &Bytes, codec: &Arc<BodyCodec>) -> Body {
        let Ok(len) = u32::try_from(plain.len()) else {
            return Body::Plain(plain.clone());
        };
        match codec.pack(plain) {
            Some(data) => Body::Packed {
                codec: codec.clone(),
                len,
                data,
            },
            None => Body::Plain(plain.clone()),
        }
    }

    /// The body's bytes (unpacked into a new buffer when packed).
    pub fn bytes(&self) -> Bytes {
        match self {
            Body::Plain(b) => b.clone(),
            Body::Packed { codec, len, data } => codec.unpack(data, *len as usize),
        }
    }

    /// Length of the body's bytes.
    pub fn len(&self) -> usize {
        match self {
            Body::Plain(b) => b.len(),
            Body::Packed { len, .. } => *len as usize,
        }
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory for the body (packed size when packed).
    pub fn held_bytes(&self) -> usize {
        match self {
            Body::Plain(b) => b.len(),
            Body::Packed { data, .. } => data.len(),
        }
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        match (self, other) {
            (Body::Plain(a), Body::Plain(b)) => a == b,
            // One codec packs equal bodies into equal frames.
            (
                Body::Packed {
                    codec: c1,
                    len: l1,
                    data: d1,
                },
                Body::Packed {
                    codec: c2,
                    len: l2,
                    data: d2,
                },
            ) if Arc::ptr_eq(c1, c2) => l1 == l2 && d1 == d2,
            _ => self.len() == other.len() && self.bytes() == other.bytes(),
        }
    }
}

impl Eq for Body {}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| {
                Bytes::from(format!(
                    r#"{{"apiVersion":"backstage.io/v1alpha1","kind":"Component","metadata":{{"name":"svc-{i:05}","uid":"u{i}","etag":"e{i}","annotations":{{"backstage.io/source-location":"url:https://example.com/svc-{i}"}}}},"spec":{{"type":"service","lifecycle":"production","owner":"team-{}"}}}}"#,
                    i % 17
                ))
            })
            .collect()
    }

    #[test]
    fn packed_bodies_unpack_byte_for_byte_and_are_smaller() {
        let plain = bodies(2000);
        let slices: Vec<&[u8]> = plain.iter().map(|b| &b[..]).collect();
        let codec = BodyCodec::train(&slices).expect("enough samples");
        let (mut held, mut raw) = (0, 0);
        for b in &plain {
            let packed = Body::pack(b, &codec);
            assert!(matches!(packed, Body::Packed { .. }));
            assert_eq!(packed.bytes(), *b);
            assert_eq!(packed.len(), b.len());
            assert_eq!(packed, Body::Plain(b.clone()));
            held += packed.held_bytes();
            raw += b.len();
        }
        assert!(held * 2 < raw, "{held} of {raw}");
    }

    #[test]
    fn few_bodies_train_no_codec() {
        let plain = bodies(10);
        let slices: Vec<&[u8]> = plain.iter().map(|b| &b[..]).collect();
        assert!(BodyCodec::train(&slices).is_none());
    }

    #[test]
    fn equality_compares_the_bytes_across_codecs() {
        let plain = bodies(1500);
        let slices: Vec<&[u8]> = plain.iter().map(|b| &b[..]).collect();
        let (a, b) = (
            BodyCodec::train(&slices).unwrap(),
            BodyCodec::train(&slices[..1200]).unwrap(),
        );
        assert_eq!(Body::pack(&plain[7], &a), Body::pack(&plain[7], &b));
        assert_ne!(Body::pack(&plain[7], &a), Body::pack(&plain[8], &a));
        assert_ne!(Body::pack(&plain[7], &a), Body::pack(&plain[8], &b));
    }
}
