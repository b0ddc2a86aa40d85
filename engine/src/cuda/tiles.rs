//! The work list of the variable-length attention kernel: one tile per `block_m` query rows of a
//! sequence (ABI: kernels/attention.cu). Pure host logic, tested on the CPU.

/// Attention work tiles of a packed batch, as the kernel reads them (two parallel `i32` arrays).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TileList {
    /// The sequence of each tile (index into `cu_seqlens`).
    pub seq: Vec<i32>,
    /// The first query position of each tile, relative to its sequence's start.
    pub start: Vec<i32>,
}

impl TileList {
    /// Tiles of `block_m` query rows covering every position of every sequence exactly once.
    ///
    /// Ordered by decreasing work: a causal tile starting at position `p` reads `p + block_m` keys,
    /// so the tiles deepest into long sequences go first and the short ones fill the tail of the
    /// grid (the block scheduler issues blocks roughly in index order).
    pub fn new(cu_seqlens: &[usize], block_m: usize) -> Self {
        assert!(block_m > 0, "tile height must be positive");
        let mut tiles: Vec<(usize, usize)> = Vec::new();
        for (s, w) in cu_seqlens.windows(2).enumerate() {
            let len = w[1] - w[0];
            tiles.extend((0..len).step_by(block_m).map(|start| (s, start)));
        }
        // Stable sort: equal starts keep sequence order, so the list is deterministic.
        tiles.sort_by_key(|t| std::cmp::Reverse(t.1));
        TileList { seq: tiles.iter().map(|t| t.0 as i32).collect(), start: tiles.iter().map(|t| t.1 as i32).collect() }
    }

    /// Number of tiles.
    pub fn len(&self) -> usize {
        self.seq.len()
    }

    /// Whether there is no tile (empty batch).
    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expands the tiles into (sequence, position) pairs, clipped to each sequence like the kernel.
    fn covered(t: &TileList, cu: &[usize], block_m: usize) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (&s, &start) in t.seq.iter().zip(&t.start) {
            let len = cu[s as usize + 1] - cu[s as usize];
            assert!((start as usize) < len, "tile ({s}, {start}) starts outside a sequence of {len}");
            assert_eq!(start as usize % block_m, 0, "tiles are aligned to block_m");
            for p in start as usize..(start as usize + block_m).min(len) {
                v.push((s as usize, p));
            }
        }
        v.sort_unstable();
        v
    }

    #[test]
    fn every_query_position_is_in_exactly_one_tile() {
        for (lens, block_m) in [(vec![1usize, 63, 64, 65, 200, 128], 64), (vec![5, 1, 1, 300], 16), (vec![7], 1)] {
            let mut cu = vec![0];
            for l in &lens {
                cu.push(cu.last().unwrap() + l);
            }
            let t = TileList::new(&cu, block_m);
            let want: Vec<(usize, usize)> =
                lens.iter().enumerate().flat_map(|(s, &l)| (0..l).map(move |p| (s, p))).collect();
            assert_eq!(covered(&t, &cu, block_m), want, "lengths {lens:?}, block {block_m}");
            let expected_tiles: usize = lens.iter().map(|l| l.div_ceil(block_m)).sum();
            assert_eq!(t.len(), expected_tiles);
        }
    }

    #[test]
    fn deepest_tiles_come_first_and_ties_keep_sequence_order() {
        let t = TileList::new(&[0, 10, 140, 150], 64);
        // Sequence 1 (130 tokens) has tiles at 0, 64, 128; sequences 0 and 2 one tile each at 0.
        assert_eq!(t.start, vec![128, 64, 0, 0, 0]);
        assert_eq!(t.seq, vec![1, 1, 0, 1, 2]);
    }

    #[test]
    fn an_empty_batch_has_no_tiles() {
        assert!(TileList::new(&[0], 64).is_empty());
    }
}
