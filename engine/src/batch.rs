//! Packed variable-length batches: every sequence's tokens back to back, with cumulative offsets
//! (flash-attention "varlen" style). No padding anywhere, so cost follows real tokens.

use crate::error::{EngineError, Result};

/// Sequences packed into one token array.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedBatch {
    tokens: Vec<u32>,
    /// `cu_seqlens[i]..cu_seqlens[i + 1]` are the tokens of sequence `i`; starts with 0.
    cu_seqlens: Vec<usize>,
}

impl PackedBatch {
    /// An empty batch.
    pub fn new() -> Self {
        PackedBatch { tokens: Vec::new(), cu_seqlens: vec![0] }
    }

    /// Packs `seqs` in order.
    pub fn from_sequences<S: AsRef<[u32]>>(seqs: &[S]) -> Result<Self> {
        let mut b = Self::new();
        for s in seqs {
            b.push(s.as_ref())?;
        }
        Ok(b)
    }

    /// Appends one sequence; empty sequences are refused (there is no last token to score).
    pub fn push(&mut self, seq: &[u32]) -> Result<()> {
        if seq.is_empty() {
            return Err(EngineError::InvalidBatch(format!("sequence {} is empty", self.len())));
        }
        self.tokens.extend_from_slice(seq);
        self.cu_seqlens.push(self.tokens.len());
        Ok(())
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    /// Whether the batch holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All tokens, packed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Cumulative sequence offsets, `len() + 1` of them.
    pub fn cu_seqlens(&self) -> &[usize] {
        &self.cu_seqlens
    }

    /// Token range of sequence `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[i]..self.cu_seqlens[i + 1]
    }

    /// Position of every packed token within its own sequence.
    pub fn positions(&self) -> Vec<u32> {
        let mut p = Vec::with_capacity(self.tokens.len());
        for w in self.cu_seqlens.windows(2) {
            p.extend(0..(w[1] - w[0]) as u32);
        }
        p
    }

    /// Packed row index of each sequence's last token: where the score is read.
    pub fn last_rows(&self) -> Vec<usize> {
        self.cu_seqlens[1..].iter().map(|&e| e - 1).collect()
    }

    /// Length of the longest sequence.
    pub fn max_len(&self) -> usize {
        self.cu_seqlens.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_offsets_positions_and_last_rows() {
        let b = PackedBatch::from_sequences(&[vec![5, 6, 7], vec![9], vec![1, 2]]).unwrap();
        assert_eq!(b.tokens(), &[5, 6, 7, 9, 1, 2]);
        assert_eq!(b.cu_seqlens(), &[0, 3, 4, 6]);
        assert_eq!(b.positions(), vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(b.last_rows(), vec![2, 3, 5]);
        assert_eq!(b.max_len(), 3);
    }

    #[test]
    fn empty_sequence_is_refused_with_its_index() {
        let e = PackedBatch::from_sequences(&[vec![1], vec![]]).unwrap_err();
        assert!(e.to_string().contains("sequence 1 is empty"));
    }
}
