//! The byte format of the multi-node control and data connections: length-prefixed frames of
//! one kind byte and a payload. Control messages are JSON (rare, and readable in a packet
//! capture); batches and activations are little-endian binary.

use std::io::{Read, Write};

use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};

/// Largest frame accepted: a 16k-token batch of the 340B model's residual stream is 1.2 GB.
pub const MAX_FRAME: usize = 4 << 30;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Worker to leader: who I am (JSON).
    Hello = 1,
    /// Leader to worker: accepted, with the peer table (JSON).
    Welcome = 2,
    /// Either way: a refusal or failure, with the reason (JSON string).
    Error = 3,
    /// Leader to workers: a packed batch to run.
    Batch = 4,
    /// Last stage's node to leader: raw head outputs of one batch.
    Outputs = 5,
    /// Stage to next stage: a residual stream.
    Tensor = 6,
    /// Worker to leader: loaded and connected.
    Ready = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Error,
            4 => Kind::Batch,
            5 => Kind::Outputs,
            6 => Kind::Tensor,
            7 => Kind::Ready,
            other => return Err(EngineError::Parallel(format!("unknown frame kind {other} from a peer"))),
        })
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Parallel(format!("{what}: {e}"))
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len() + 1)
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or_else(|| EngineError::Parallel(format!("a frame of {} bytes is too large", payload.len())))?;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4] = kind as u8;
    w.write_all(&head).and_then(|_| w.write_all(payload)).and_then(|_| w.flush()).map_err(io("sending to a peer"))
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> Result<(Kind, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(io("receiving from a peer"))?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(EngineError::Parallel(format!("a peer sent a frame of {len} bytes")));
    }
    let kind = Kind::from_u8(head[4])?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload).map_err(io("receiving from a peer"))?;
    Ok((kind, payload))
}

/// Reads a frame and checks its kind; an `Error` frame becomes that error.
pub fn expect_frame(r: &mut impl Read, want: Kind) -> Result<Vec<u8>> {
    match read_frame(r)? {
        (k, p) if k == want => Ok(p),
        (Kind::Error, p) => Err(EngineError::Parallel(serde_json::from_slice::<String>(&p).unwrap_or_default())),
        (k, _) => Err(EngineError::Parallel(format!("expected a {want:?} frame from a peer, got {k:?}"))),
    }
}

fn u32s(v: &mut Vec<u8>, xs: impl IntoIterator<Item = u32>) {
    for x in xs {
        v.extend_from_slice(&x.to_le_bytes());
    }
}

fn take_u32s(p: &[u8], n: usize, at: &mut usize) -> Result<Vec<u32>> {
    let end = n.checked_mul(4).and_then(|b| b.checked_add(*at)).ok_or_else(truncated)?;
    let bytes = p.get(*at..end).ok_or_else(truncated)?;
    *at = end;
    Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A packed batch as bytes: segment count, each segment's length, parent (its index + 1, or 0
/// for none) and the parent rows it continues, item count, each item's read row, then the tokens. The whole structure travels,
/// so every stage of every node computes the same shared prefixes.
pub fn encode_batch(b: &PackedBatch) -> Vec<u8> {
    let n = b.segments();
    let mut v = Vec::with_capacity(4 * (2 + 3 * n + b.len() + b.tokens().len()));
    u32s(&mut v, [n as u32]);
    u32s(
        &mut v,
        (0..n).flat_map(|s| [b.segment(s).len() as u32, b.parent(s).map_or(0, |p| p as u32 + 1), b.seen(s) as u32]),
    );
    u32s(&mut v, [b.len() as u32]);
    u32s(&mut v, b.read_rows().iter().map(|&r| r as u32));
    u32s(&mut v, b.tokens().iter().copied());
    v
}

/// The inverse of [`encode_batch`]; a malformed batch is an error, as from any other caller.
pub fn decode_batch(p: &[u8]) -> Result<PackedBatch> {
    let mut at = 0;
    let n = take_u32s(p, 1, &mut at)?[0] as usize;
    let segs = take_u32s(p, n.checked_mul(3).ok_or_else(truncated)?, &mut at)?;
    let items = take_u32s(p, 1, &mut at)?[0] as usize;
    let reads = take_u32s(p, items, &mut at)?;
    let total: usize = segs.chunks_exact(3).map(|s| s[0] as usize).sum();
    let tokens = take_u32s(p, total, &mut at)?;
    let mut batch = PackedBatch::new();
    let mut start = 0;
    for s in segs.chunks_exact(3) {
        let ids = &tokens[start..start + s[0] as usize];
        match s[1].checked_sub(1) {
            Some(p) => batch.push_segment_after(p as usize, s[2] as usize, ids)?,
            None => batch.push_segment(None, ids)?,
        };
        start += s[0] as usize;
    }
    for r in reads {
        batch.push_item(r as usize)?;
    }
    Ok(batch)
}

fn truncated() -> EngineError {
    EngineError::Parallel("a peer sent a truncated frame".into())
}

/// Rows of f32 values (head outputs, or a residual stream) as bytes: rows, cols, values.
pub fn encode_f32(rows: usize, cols: usize, values: &[f32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 4 * values.len());
    u32s(&mut v, [rows as u32, cols as u32]);
    for x in values {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// The inverse of [`encode_f32`]: `(rows, cols, values)`.
pub fn decode_f32(p: &[u8]) -> Result<(usize, usize, Vec<f32>)> {
    let mut at = 0;
    let rc = take_u32s(p, 2, &mut at)?;
    let (rows, cols) = (rc[0] as usize, rc[1] as usize);
    let bits = take_u32s(p, rows * cols, &mut at)?;
    Ok((rows, cols, bits.into_iter().map(f32::from_bits).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_tensors_round_trip_and_garbage_is_an_error() {
        let mut b = PackedBatch::from_sequences(&[vec![1u32, 2, 3], vec![7], vec![4, 5]]).unwrap();
        b.push_group(&[9, 8], &[vec![7u32], vec![], vec![6, 5]]).unwrap();
        // A branch that sees only part of the item it continues.
        b.push_continuation(5, 3, &[4]).unwrap();
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Batch, &encode_batch(&b)).unwrap();
        write_frame(&mut buf, Kind::Tensor, &encode_f32(2, 2, &[1.0, -2.5, 3.0, f32::MIN_POSITIVE])).unwrap();
        let mut r = &buf[..];
        let got = decode_batch(&expect_frame(&mut r, Kind::Batch).unwrap()).unwrap();
        assert_eq!(got.tokens(), b.tokens());
        assert_eq!(got, b, "segments, parents, seen rows and read rows survive the wire");
        assert_eq!(got.item_tokens(6), [9, 8, 6, 4]);
        let (rows, cols, v) = decode_f32(&expect_frame(&mut r, Kind::Tensor).unwrap()).unwrap();
        assert_eq!((rows, cols, v), (2, 2, vec![1.0, -2.5, 3.0, f32::MIN_POSITIVE]));
        assert!(read_frame(&mut r).unwrap_err().to_string().contains("receiving from a peer"));
        assert!(decode_batch(&[5, 0, 0, 0, 1]).unwrap_err().to_string().contains("truncated"));
        // One segment of one token whose parent is itself, and an item past the end.
        let own_parent = [1u32, 1, 1, 1, 0, 7].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>();
        assert!(decode_batch(&own_parent).unwrap_err().to_string().contains("segment 0 continues segment 0"));
        let past_end = [1u32, 1, 0, 0, 1, 1, 7].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>();
        assert!(decode_batch(&past_end).unwrap_err().to_string().contains("item 0 reads row 1"));
        // A child that claims to see more rows than its parent has.
        let too_far = [2u32, 1, 0, 0, 1, 1, 2, 0, 7, 8].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>();
        let e = decode_batch(&too_far).unwrap_err().to_string();
        assert!(e.contains("segment 1 continues 2 rows of segment 0, which has 1"), "{e}");
        let mut bad = &[2u8, 0, 0, 0, 42, 0][..];
        assert!(read_frame(&mut bad).unwrap_err().to_string().contains("unknown frame kind 42"));
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Error, br#""stage 1 failed""#).unwrap();
        let e = expect_frame(&mut &buf[..], Kind::Welcome).unwrap_err().to_string();
        assert!(e.contains("stage 1 failed"), "{e}");
    }
}
