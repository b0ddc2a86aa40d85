//! Packed variable-length batches: every segment's tokens back to back, with cumulative offsets
//! (flash-attention "varlen" style). No padding anywhere, so cost follows real tokens.
//!
//! A batch is a forest of segments. A root segment is an ordinary sequence; a segment with a
//! parent continues it: its positions start after the parent's last position and its tokens
//! attend to every ancestor's tokens (root first) and then causally to its own. That is how a
//! prompt shared by several candidates is computed once: the prompt is a root segment and each
//! candidate's remaining tokens a child of it. Items are what the caller reads: each item names
//! the packed row whose hidden state is scored, so an item whose ids equal a shared prefix reads
//! the prefix's last row.
//!
//! A child may also see only the first rows of its parent (`seen`): a per-turn score of a
//! conversation is a short branch (the template's closing tokens) that continues the conversation
//! right after one turn, while the conversation itself goes on in the parent. Its positions start
//! at that turn's end, and its tokens attend to exactly the parent rows before it.

use std::ops::Range;

use crate::error::{EngineError, Result};

/// Segments packed into one token array, and the rows their items are read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    tokens: Vec<u32>,
    /// `cu_seqlens[s]..cu_seqlens[s + 1]` are the tokens of segment `s`; starts with 0.
    cu_seqlens: Vec<usize>,
    /// The segment each segment continues; always an earlier one, so the packing order is a
    /// valid order to compute them in.
    parents: Vec<Option<usize>>,
    /// Per segment, how many of its parent's rows it continues (0 for a root).
    seen: Vec<usize>,
    /// Position (within its full sequence) of each segment's first token.
    first_positions: Vec<usize>,
    /// Per item, the packed row its outputs are read at.
    reads: Vec<usize>,
}

impl Default for PackedBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PackedBatch {
    /// An empty batch.
    pub fn new() -> Self {
        PackedBatch {
            tokens: Vec::new(),
            cu_seqlens: vec![0],
            parents: Vec::new(),
            seen: Vec::new(),
            first_positions: Vec::new(),
            reads: Vec::new(),
        }
    }

    /// Packs `seqs` in order, each its own item read at its last token.
    pub fn from_sequences<S: AsRef<[u32]>>(seqs: &[S]) -> Result<Self> {
        let mut b = Self::new();
        for s in seqs {
            b.push(s.as_ref())?;
        }
        Ok(b)
    }

    /// Appends one unshared sequence as an item read at its last token; empty sequences are
    /// refused (there is no last token to score).
    pub fn push(&mut self, seq: &[u32]) -> Result<()> {
        if seq.is_empty() {
            return Err(EngineError::InvalidBatch(format!("sequence {} is empty", self.len())));
        }
        let s = self.push_segment(None, seq)?;
        self.push_item(self.segment(s).end - 1)
    }

    /// Appends `prefix` once and, per branch, an item that is `prefix` followed by that branch:
    /// a non-empty branch becomes a child segment read at its last token, an empty one reads the
    /// prefix's last row.
    pub fn push_group<S: AsRef<[u32]>>(&mut self, prefix: &[u32], branches: &[S]) -> Result<()> {
        if prefix.is_empty() {
            return Err(EngineError::InvalidBatch(format!("the shared prefix of item {} is empty", self.len())));
        }
        let p = self.push_segment(None, prefix)?;
        let prefix_last = self.segment(p).end - 1;
        for b in branches {
            let row = match b.as_ref() {
                [] => prefix_last,
                b => {
                    let s = self.push_segment(Some(p), b)?;
                    self.segment(s).end - 1
                }
            };
            self.push_item(row)?;
        }
        Ok(())
    }

    /// Appends a segment continuing `parent` (an earlier segment), or a new sequence for `None`,
    /// and returns its index. Reads nothing by itself: add items with [`PackedBatch::push_item`].
    pub fn push_segment(&mut self, parent: Option<usize>, tokens: &[u32]) -> Result<usize> {
        match parent {
            Some(p) if p < self.segments() => self.push_segment_after(p, self.segment(p).len(), tokens),
            _ => self.push_segment_after_rows(parent, 0, tokens),
        }
    }

    /// Appends a segment that continues the first `seen` rows of segment `parent` (an earlier
    /// one; `1..=` its length) and returns its index: its positions start right after those rows
    /// and it attends to them, not to the parent's later rows.
    pub fn push_segment_after(&mut self, parent: usize, seen: usize, tokens: &[u32]) -> Result<usize> {
        self.push_segment_after_rows(Some(parent), seen, tokens)
    }

    fn push_segment_after_rows(&mut self, parent: Option<usize>, seen: usize, tokens: &[u32]) -> Result<usize> {
        let s = self.segments();
        if tokens.is_empty() {
            return Err(EngineError::InvalidBatch(format!("segment {s} is empty")));
        }
        let first = match parent {
            None => 0,
            Some(p) if p < s && (1..=self.segment(p).len()).contains(&seen) => self.first_positions[p] + seen,
            Some(p) if p < s => {
                return Err(EngineError::InvalidBatch(format!(
                    "segment {s} continues {seen} rows of segment {p}, which has {}",
                    self.segment(p).len()
                )))
            }
            Some(p) => {
                return Err(EngineError::InvalidBatch(format!(
                    "segment {s} continues segment {p}, which does not come before it"
                )))
            }
        };
        self.tokens.extend_from_slice(tokens);
        self.cu_seqlens.push(self.tokens.len());
        self.parents.push(parent);
        self.seen.push(if parent.is_some() { seen } else { 0 });
        self.first_positions.push(first);
        Ok(s)
    }

    /// Adds an item whose sequence is the first `seen` tokens of item `item`'s sequence followed
    /// by `tokens`: a branch off that item's rows (a per-turn score: the conversation up to a
    /// turn's end, then the template's closing tokens). With no `tokens` it reads row `seen - 1`
    /// of the item. Returns the new item's index.
    pub fn push_continuation(&mut self, item: usize, seen: usize, tokens: &[u32]) -> Result<usize> {
        let n = self.len();
        let len = self.reads.get(item).map(|_| self.item_len(item)).ok_or_else(|| {
            EngineError::InvalidBatch(format!("item {n} continues item {item}, which does not exist"))
        })?;
        if !(1..=len).contains(&seen) {
            return Err(EngineError::InvalidBatch(format!(
                "item {n} continues {seen} tokens of item {item}, which has {len}"
            )));
        }
        // The segment of the item's chain that holds its position `seen - 1`.
        let mut s = self.segment_of(self.reads[item]);
        while self.first_positions[s] >= seen {
            s = self.parents[s].expect("a root starts at position 0, below seen");
        }
        let rows = seen - self.first_positions[s];
        let row = if tokens.is_empty() {
            self.segment(s).start + rows - 1
        } else {
            let c = self.push_segment_after(s, rows, tokens)?;
            self.segment(c).end - 1
        };
        self.push_item(row)?;
        Ok(n)
    }

    /// Adds an item read at packed row `row`: its sequence is that row's segment's ancestors and
    /// the segment up to and including `row`.
    pub fn push_item(&mut self, row: usize) -> Result<()> {
        if row >= self.tokens.len() {
            return Err(EngineError::InvalidBatch(format!(
                "item {} reads row {row}, but the batch has {} rows",
                self.len(),
                self.tokens.len()
            )));
        }
        self.reads.push(row);
        Ok(())
    }

    /// Moves item `item`'s read to the `offset`-th token (from 0) of its sequence, which must be
    /// at or before where it reads now: how a model that reads its score before trailing pad
    /// tokens ([`crate::ModelSpec::read_offset`]) is served. Tokens after the read row do not
    /// change it (attention is causal), so the item's outputs are those of its sequence cut there.
    pub fn read_at(&mut self, item: usize, offset: usize) -> Result<()> {
        let Some(&row) = self.reads.get(item) else {
            return Err(EngineError::InvalidBatch(format!("item {item} is not in a batch of {}", self.len())));
        };
        let s = self.segment_of(row);
        let mut chain = self.ancestor_rows(s);
        chain.push(self.segment(s).start..row + 1);
        let mut left = offset;
        for rows in chain {
            if left < rows.len() {
                self.reads[item] = rows.start + left;
                return Ok(());
            }
            left -= rows.len();
        }
        Err(EngineError::InvalidBatch(format!(
            "item {item} cannot read token {offset}: it reads {} tokens",
            self.item_len(item)
        )))
    }

    /// Moves every item's read to where `spec`'s model reads a score in the item's sequence
    /// ([`crate::ModelSpec::read_offset`]: before trailing pad tokens). Nothing moves for a
    /// model without a pad id. Call it after every item is pushed: continuations
    /// ([`PackedBatch::push_continuation`]) may extend an item up to its original read.
    pub fn read_as_model(&mut self, spec: &crate::ModelSpec) -> Result<()> {
        if spec.pad_token_id.is_none() {
            return Ok(());
        }
        for item in 0..self.len() {
            let ids = self.item_tokens(item);
            let offset = spec.read_offset(&ids);
            if offset + 1 != ids.len() {
                self.read_at(item, offset)?;
            }
        }
        Ok(())
    }

    /// Number of items (what [`crate::Model::forward`] returns outputs for).
    pub fn len(&self) -> usize {
        self.reads.len()
    }

    /// Whether the batch holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.parents.len()
    }

    /// All tokens, packed: each computed once, however many items share it.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Cumulative segment offsets, `segments() + 1` of them.
    pub fn cu_seqlens(&self) -> &[usize] {
        &self.cu_seqlens
    }

    /// Packed rows of segment `s`.
    pub fn segment(&self, s: usize) -> Range<usize> {
        self.cu_seqlens[s]..self.cu_seqlens[s + 1]
    }

    /// The segment that segment `s` continues.
    pub fn parent(&self, s: usize) -> Option<usize> {
        self.parents[s]
    }

    /// Whether some segment continues another (the batch shares computation between items).
    pub fn is_shared(&self) -> bool {
        self.parents.iter().any(Option::is_some)
    }

    /// Position of segment `s`'s first token within its full sequence.
    pub fn first_position(&self, s: usize) -> usize {
        self.first_positions[s]
    }

    /// How many of its parent's rows segment `s` continues (0 for a root).
    pub fn seen(&self, s: usize) -> usize {
        self.seen[s]
    }

    /// The rows that segment `s`'s tokens attend to before their own segment: each ancestor's
    /// rows as far as the chain sees them, root first, which is their order in the unshared
    /// sequence.
    pub fn ancestor_rows(&self, s: usize) -> Vec<Range<usize>> {
        let mut chain = Vec::new();
        let mut at = s;
        while let Some(p) = self.parents[at] {
            let start = self.segment(p).start;
            chain.push(start..start + self.seen[at]);
            at = p;
        }
        chain.reverse();
        chain
    }

    /// The segment holding packed row `row`.
    fn segment_of(&self, row: usize) -> usize {
        self.cu_seqlens.partition_point(|&c| c <= row) - 1
    }

    /// Position of every packed token within its full sequence.
    pub fn positions(&self) -> Vec<u32> {
        let mut p = Vec::with_capacity(self.tokens.len());
        for s in 0..self.segments() {
            let first = self.first_positions[s] as u32;
            p.extend(first..first + self.segment(s).len() as u32);
        }
        p
    }

    /// Packed row of each item's read position: where its score is read.
    pub fn read_rows(&self) -> &[usize] {
        &self.reads
    }

    /// Length of item `i`'s full sequence (shared tokens included).
    pub fn item_len(&self, i: usize) -> usize {
        let row = self.reads[i];
        let s = self.segment_of(row);
        self.first_positions[s] + (row - self.cu_seqlens[s]) + 1
    }

    /// Item `i`'s full sequence of token ids, as it would be packed alone.
    pub fn item_tokens(&self, i: usize) -> Vec<u32> {
        let row = self.reads[i];
        let s = self.segment_of(row);
        let mut ids: Vec<u32> =
            self.ancestor_rows(s).into_iter().flat_map(|r| self.tokens[r].iter().copied()).collect();
        ids.extend_from_slice(&self.tokens[self.cu_seqlens[s]..=row]);
        ids
    }

    /// Sum of every item's full length: the tokens an unshared batch would compute for the same
    /// items (more than [`PackedBatch::tokens`] when items share).
    pub fn item_tokens_total(&self) -> usize {
        (0..self.len()).map(|i| self.item_len(i)).sum()
    }

    /// The same items with nothing shared: each its full sequence, read at its last token (for a
    /// backend whose attention cannot read a prefix's keys).
    pub fn unshared(&self) -> PackedBatch {
        let mut b = PackedBatch::new();
        for i in 0..self.len() {
            let ids = self.item_tokens(i);
            let s = b.push_segment(None, &ids).expect("an item has at least its read row");
            b.reads.push(b.segment(s).end - 1);
        }
        b
    }

    /// One past the largest position in the batch: the rotary tables must reach this far.
    pub fn max_len(&self) -> usize {
        (0..self.segments()).map(|s| self.first_positions[s] + self.segment(s).len()).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_offsets_positions_and_read_rows() {
        let b = PackedBatch::from_sequences(&[vec![5, 6, 7], vec![9], vec![1, 2]]).unwrap();
        assert_eq!(b.tokens(), &[5, 6, 7, 9, 1, 2]);
        assert_eq!(b.cu_seqlens(), &[0, 3, 4, 6]);
        assert_eq!(b.positions(), vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(b.read_rows(), &[2, 3, 5]);
        assert_eq!(b.max_len(), 3);
        assert!(!b.is_shared());
    }

    #[test]
    fn a_group_computes_its_prefix_once_and_branches_continue_its_positions() {
        let mut b = PackedBatch::new();
        b.push(&[8, 8]).unwrap();
        b.push_group(&[1, 2, 3], &[vec![4, 5], vec![], vec![6]]).unwrap();
        assert_eq!(b.tokens(), &[8, 8, 1, 2, 3, 4, 5, 6]);
        assert_eq!(b.cu_seqlens(), &[0, 2, 5, 7, 8]);
        assert_eq!(b.positions(), vec![0, 1, 0, 1, 2, 3, 4, 3]);
        // The empty branch reads the prefix's last row.
        assert_eq!(b.read_rows(), &[1, 6, 4, 7]);
        assert_eq!((0..4).map(|i| b.item_len(i)).collect::<Vec<_>>(), [2, 5, 3, 4]);
        assert_eq!(b.item_tokens(1), [1, 2, 3, 4, 5]);
        assert_eq!(b.item_tokens(2), [1, 2, 3]);
        assert_eq!(b.item_tokens(3), [1, 2, 3, 6]);
        assert_eq!(b.ancestor_rows(3), std::iter::once(2..5).collect::<Vec<_>>());
        assert_eq!(b.item_tokens_total(), 14);
        assert_eq!(b.max_len(), 5);
        assert!(b.is_shared());
        let flat = b.unshared();
        assert_eq!(
            flat,
            PackedBatch::from_sequences(&[&[8, 8][..], &[1, 2, 3, 4, 5], &[1, 2, 3], &[1, 2, 3, 6]]).unwrap()
        );
    }

    #[test]
    fn deeper_trees_chain_their_ancestors_root_first() {
        let mut b = PackedBatch::new();
        let root = b.push_segment(None, &[1, 2]).unwrap();
        let mid = b.push_segment(Some(root), &[3]).unwrap();
        let leaf = b.push_segment(Some(mid), &[4, 5]).unwrap();
        b.push_item(4).unwrap();
        assert_eq!(b.ancestor_rows(leaf), vec![0..2, 2..3]);
        assert_eq!(b.positions(), vec![0, 1, 2, 3, 4]);
        assert_eq!(b.item_tokens(0), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn continuations_see_only_the_rows_before_them() {
        // A conversation of 6 tokens with turn ends after 2 and 5 tokens, and its closing token 9.
        let mut b = PackedBatch::new();
        b.push_group(&[1, 2, 3], &[vec![4, 5, 6]]).unwrap();
        assert_eq!(b.push_continuation(0, 2, &[9]).unwrap(), 1);
        assert_eq!(b.push_continuation(0, 5, &[9, 9]).unwrap(), 2);
        // No closing tokens: the item reads the conversation's own row.
        assert_eq!(b.push_continuation(0, 4, &[]).unwrap(), 3);
        assert_eq!(b.item_tokens(1), [1, 2, 9]);
        assert_eq!(b.item_tokens(2), [1, 2, 3, 4, 5, 9, 9]);
        assert_eq!(b.item_tokens(3), [1, 2, 3, 4]);
        assert_eq!(b.read_rows()[3], 3);
        // The first branch continues 2 rows of the root, the second 2 rows of the child.
        assert_eq!(b.ancestor_rows(2), vec![0..2]);
        assert_eq!(b.ancestor_rows(3), vec![0..3, 3..5]);
        assert_eq!((b.seen(2), b.seen(3)), (2, 2));
        assert_eq!(b.positions(), vec![0, 1, 2, 3, 4, 5, 2, 5, 6]);
        assert_eq!(b.item_len(2), 7);
        let flat = b.unshared();
        assert_eq!(flat.item_tokens(2), [1, 2, 3, 4, 5, 9, 9]);
        assert!(!flat.is_shared());
        let e = b.push_continuation(1, 4, &[1]).unwrap_err().to_string();
        assert!(e.contains("item 4 continues 4 tokens of item 1, which has 3"), "{e}");
        let e = b.push_continuation(9, 1, &[1]).unwrap_err().to_string();
        assert!(e.contains("item 4 continues item 9, which does not exist"), "{e}");
        let e = b.push_segment_after(0, 0, &[1]).unwrap_err().to_string();
        assert!(e.contains("continues 0 rows of segment 0, which has 3"), "{e}");
    }

    #[test]
    fn malformed_batches_are_refused_with_where() {
        let e = PackedBatch::from_sequences(&[vec![1], vec![]]).unwrap_err();
        assert!(e.to_string().contains("sequence 1 is empty"), "{e}");
        let mut b = PackedBatch::new();
        let e = b.push_segment(Some(0), &[1]).unwrap_err();
        assert!(e.to_string().contains("segment 0 continues segment 0"), "{e}");
        b.push(&[1, 2]).unwrap();
        let e = b.push_item(2).unwrap_err();
        assert!(e.to_string().contains("item 1 reads row 2, but the batch has 2 rows"), "{e}");
        let e = b.push_group::<&[u32]>(&[], &[]).unwrap_err();
        assert!(e.to_string().contains("shared prefix of item 1 is empty"), "{e}");
    }

    #[test]
    fn an_item_can_read_earlier_in_its_own_sequence_across_its_prefix() {
        let mut b = PackedBatch::from_sequences(&[vec![1u32, 2, 3]]).unwrap();
        b.push_group(&[9, 8], &[vec![7u32, 6], vec![]]).unwrap();
        // Rows: [1 2 3 | 9 8 | 7 6]; items read 2, 6 and 4.
        b.read_at(0, 1).unwrap();
        b.read_at(1, 1).unwrap(); // inside the shared prefix
        assert_eq!(b.read_rows(), &[1, 4, 4]);
        assert_eq!((b.item_len(0), b.item_len(1)), (2, 2));
        let mut b2 = PackedBatch::new();
        b2.push_group(&[9, 8], &[vec![7u32, 6]]).unwrap();
        b2.read_at(0, 2).unwrap(); // first token of the branch
        assert_eq!(b2.read_rows(), &[2]);
        let e = b2.read_at(0, 3).unwrap_err().to_string();
        assert!(e.contains("item 0 cannot read token 3: it reads 3 tokens"), "{e}");
        assert!(b2.read_at(1, 0).unwrap_err().to_string().contains("item 1 is not in a batch of 1"));
    }
}
