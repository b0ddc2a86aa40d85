//! Shared-prefix grouping: which jobs of a batch compute a common token-id prefix once.
//!
//! Jobs join a group when their ids start with the group's prefix for at least the configured
//! minimum (64 tokens by default): a prefix trie of depth two, kept as a list of groups, each
//! with the longest common prefix of its members. Candidates of one Rank request (same group
//! id) share whatever prefix they have, however short. Grouping is on token ids only, so an
//! item's tokens and positions are exactly those it has alone and, on the CPU, so are its bits.

use arbiter_engine::{ModelSpec, PackedBatch};

use crate::queue::Job;

/// One group: members (indices into the batch's jobs) sharing `prefix` leading tokens.
#[derive(Debug, Clone)]
struct Group {
    /// A member whose ids hold the prefix.
    first: usize,
    /// Shared leading tokens of every member.
    prefix: usize,
    /// Members, in the order they joined.
    members: Vec<usize>,
    /// Sum of the members' full lengths.
    total: usize,
    /// The Rank request the group began with, if any.
    request: Option<u64>,
}

impl Group {
    /// Tokens the group computes: the prefix once, every member's rest.
    fn cost(&self) -> usize {
        self.total - (self.members.len() - 1) * self.prefix
    }

    /// The cost after `len` tokens sharing `common` with the prefix join.
    fn cost_with(&self, len: usize, common: usize) -> usize {
        let p = self.prefix.min(common);
        self.total + len - self.members.len() * p
    }
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The grouping of a batch as it fills: what it computes, and where the next job would go.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    groups: Vec<Group>,
    computed: usize,
    items: usize,
}

/// Where a job would go and what it would add to the batch's computed tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    /// The group it joins (sharing its prefix), or `None` for a group of its own.
    pub group: Option<usize>,
    /// Computed tokens it adds.
    pub cost: usize,
}

impl Plan {
    /// Tokens the batch computes.
    pub fn computed(&self) -> usize {
        self.computed
    }

    /// The cheapest place for a job with ids `ids` (of Rank request `request`); `ids_of(i)`
    /// gives the ids of the batch's job `i`. `min_shared` `None` turns sharing off; a `solo` job
    /// (one with per-turn branches) shares with nobody, so that its tree stays two levels deep,
    /// the depth the CUDA attention kernel shares.
    pub fn place<'a>(
        &self,
        ids: &[u32],
        request: Option<u64>,
        min_shared: Option<usize>,
        solo: bool,
        ids_of: impl Fn(usize) -> &'a [u32],
    ) -> Placement {
        let alone = Placement { group: None, cost: ids.len() };
        let Some(min) = min_shared.filter(|_| !solo) else { return alone };
        let mut best = alone;
        for (g, group) in self.groups.iter().enumerate() {
            let common = common_prefix(&ids_of(group.first)[..group.prefix], ids);
            let same_request = request.is_some() && request == group.request;
            if common == 0 || (common < min && !same_request) {
                continue;
            }
            let cost = group.cost_with(ids.len(), common) - group.cost();
            if cost < best.cost {
                best = Placement { group: Some(g), cost };
            }
        }
        best
    }

    /// Adds the batch's job `job` (ids `ids`, Rank request `request`, `solo` as for
    /// [`Plan::place`]) where `at` says.
    pub fn add<'a>(
        &mut self,
        job: usize,
        ids: &[u32],
        request: Option<u64>,
        solo: bool,
        at: Placement,
        ids_of: impl Fn(usize) -> &'a [u32],
    ) {
        match at.group {
            Some(g) => {
                let group = &mut self.groups[g];
                group.prefix = common_prefix(&ids_of(group.first)[..group.prefix], ids);
                group.members.push(job);
                group.total += ids.len();
            }
            None => {
                // A solo job's group has no prefix to offer, so nobody joins it.
                let prefix = if solo { 0 } else { ids.len() };
                self.groups.push(Group { first: job, prefix, members: vec![job], total: ids.len(), request })
            }
        }
        self.computed += at.cost;
        self.items += 1;
    }

    /// Packs the batch: per group its prefix once and each member's rest as a branch (a group of
    /// one is a plain sequence). Returns the batch, the job index of each of its items in order,
    /// and the number of groups that share (two members or more).
    pub fn pack<'a>(
        &self,
        ids_of: impl Fn(usize) -> &'a [u32],
    ) -> arbiter_engine::Result<(PackedBatch, Vec<usize>, usize)> {
        let mut batch = PackedBatch::new();
        let mut order = Vec::with_capacity(self.items);
        let mut shared = 0;
        for g in &self.groups {
            if let [only] = g.members[..] {
                batch.push(ids_of(only))?;
            } else {
                let branches: Vec<&[u32]> = g.members.iter().map(|&m| &ids_of(m)[g.prefix..]).collect();
                batch.push_group(&ids_of(g.first)[..g.prefix], &branches)?;
                shared += 1;
            }
            order.extend_from_slice(&g.members);
        }
        Ok((batch, order, shared))
    }
}

/// Jobs packed into one engine batch.
#[derive(Debug)]
pub struct Packed {
    /// The batch; its prefixes shared as [`BatchConfig::shared_prefix_min`] allows.
    pub batch: PackedBatch,
    /// Output `k` of the engine belongs to job `order[k]`.
    pub order: Vec<usize>,
    /// Then output `order.len() + k` is a per-turn branch of job `branch_of[k]` (a job's
    /// branches in its order).
    pub branch_of: Vec<usize>,
    /// Groups of two or more jobs that compute a prefix once.
    pub groups: usize,
}

/// Packs jobs into one engine batch, sharing common prefixes of at least `shared_prefix_min`
/// tokens (any length between candidates of one Rank request). Each item is read where `spec`'s
/// model reads its score ([`ModelSpec::read_offset`]: before trailing pad tokens, if any).
pub fn pack(jobs: &[Job], shared_prefix_min: Option<usize>, spec: &ModelSpec) -> arbiter_engine::Result<Packed> {
    let mut plan = Plan::default();
    for (i, j) in jobs.iter().enumerate() {
        let at = plan.place(&j.ids, j.request, shared_prefix_min, j.is_solo(), |k| &jobs[k].ids);
        plan.add(i, &j.ids, j.request, j.is_solo(), at, |k| &jobs[k].ids);
    }
    let (mut batch, order, groups) = plan.pack(|k| &jobs[k].ids)?;
    // Per-turn branches continue their job's item (still read at its last token, so any turn's
    // end is within it), after every job's own read.
    let mut branch_of = Vec::new();
    for (item, &k) in order.iter().enumerate() {
        for (seen, closing) in &jobs[k].branches {
            batch.push_continuation(item, *seen, closing)?;
            branch_of.push(k);
        }
    }
    // Every item, branches included, is read where its sequence alone is read.
    batch.read_as_model(spec)?;
    Ok(Packed { batch, order, branch_of, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seqs: &[(Vec<u32>, Option<u64>)], min: Option<usize>) -> Plan {
        let mut p = Plan::default();
        for (i, (ids, req)) in seqs.iter().enumerate() {
            let at = p.place(ids, *req, min, false, |j| seqs[j].0.as_slice());
            p.add(i, ids, *req, false, at, |j| seqs[j].0.as_slice());
        }
        p
    }

    fn seq(prefix: u32, plen: usize, tail: &[u32]) -> Vec<u32> {
        let mut v = vec![prefix; plen];
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn items_sharing_a_long_prefix_compute_it_once_and_short_ones_do_not_share() {
        let seqs = vec![
            (seq(7, 100, &[1, 2]), None),
            (seq(9, 10, &[1]), None),
            (seq(7, 100, &[3]), None),
            (seq(9, 10, &[2]), None), // shares 10 < 64 tokens with item 1: no sharing
            (seq(7, 100, &[]), None), // the prefix itself: a zero-length branch
        ];
        let p = plan(&seqs, Some(64));
        assert_eq!(p.computed(), 100 + 2 + 1 + 11 + 11);
        let (batch, order, shared) = p.pack(|j| seqs[j].0.as_slice()).unwrap();
        assert_eq!((order, shared), (vec![0, 2, 4, 1, 3], 1));
        assert_eq!(batch.tokens().len(), p.computed());
        for (k, &j) in [0usize, 2, 4, 1, 3].iter().enumerate() {
            assert_eq!(batch.item_tokens(k), seqs[j].0, "item {k} is job {j}'s ids");
        }
        assert_eq!(batch.read_rows()[2], 99, "the zero-length branch reads the prefix's last row");
        assert_eq!(plan(&seqs, None).computed(), seqs.iter().map(|s| s.0.len()).sum::<usize>(), "sharing off");
    }

    #[test]
    fn candidates_of_one_rank_request_share_any_prefix_and_strangers_need_the_minimum() {
        let seqs = vec![(seq(5, 8, &[1]), Some(1)), (seq(5, 8, &[2, 2]), Some(1)), (seq(5, 8, &[3]), Some(2))];
        let p = plan(&seqs, Some(64));
        assert_eq!(p.computed(), 8 + 1 + 2 + 9);
    }

    #[test]
    fn a_joining_item_shortens_the_prefix_to_what_all_members_share() {
        let a = [vec![1u32; 80], vec![2; 40]].concat();
        let b = [vec![1u32; 80], vec![2; 30], vec![3; 5]].concat();
        let c = [vec![1u32; 70], vec![4; 10]].concat();
        let seqs = vec![(a, None), (b, None), (c, None)];
        let p = plan(&seqs, Some(64));
        // After a and b the prefix is 110; c shares 70 with it, so the prefix drops to 70.
        assert_eq!(p.computed(), 70 + 50 + 45 + 10);
        let (batch, _, _) = p.pack(|j| seqs[j].0.as_slice()).unwrap();
        assert_eq!(batch.tokens().len(), p.computed());
    }

    #[test]
    fn a_job_with_per_turn_branches_shares_with_nobody_and_its_branches_come_last() {
        let spine = seq(7, 100, &[1, 2, 3]);
        let (a, _ra) = Job::new(seq(7, 100, &[9]), None);
        let (b, _rb) = Job::new(spine.clone(), None);
        let b = b.with_branches(vec![(50, vec![4]), (103, vec![])]);
        let (c, _rc) = Job::new(seq(7, 100, &[8]), None);
        let jobs = [a, b, c];
        let p = pack(&jobs, Some(64), &spec(None)).unwrap();
        // a and c share their 100 tokens; b computes its own, then one closing token.
        assert_eq!((p.order.clone(), p.branch_of.clone(), p.groups), (vec![0, 2, 1], vec![1, 1], 1));
        assert_eq!(p.batch.tokens().len(), 100 + 1 + 1 + 103 + 1);
        assert_eq!(p.batch.item_tokens(2), spine);
        assert_eq!(p.batch.item_tokens(3), seq(7, 50, &[4]));
        assert_eq!(p.batch.item_tokens(4), spine, "a branch without closing tokens reads the spine");
        // A branch is read where its sequence alone is: before a closing pad token.
        let padded = pack(&jobs, Some(64), &spec(Some(4))).unwrap();
        assert_eq!(padded.batch.item_tokens(3), seq(7, 50, &[]));
        assert_eq!(padded.batch.item_tokens(2), spine, "the spine has no trailing pad");
    }

    // The queue's use of the grouping: budget and fairness of `take_batch`.
    use crate::queue::{take_batch, BatchConfig, Reply};
    use std::collections::VecDeque;

    fn queue_of(seqs: &[Vec<u32>]) -> (VecDeque<Job>, Vec<Reply>) {
        seqs.iter().map(|ids| Job::new(ids.clone(), None)).unzip()
    }

    /// A spec whose only relevant setting is its pad id.
    fn spec(pad: Option<u32>) -> ModelSpec {
        let config = serde_json::json!({
            "architectures": ["LlamaForSequenceClassification"], "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100, "pad_token_id": pad
        });
        arbiter_engine::config::parse_config(&config.to_string(), "config.json".as_ref()).unwrap()
    }

    #[test]
    fn items_ending_in_the_pad_id_are_read_before_it_shared_or_not() {
        let p = vec![7u32; 70];
        let seqs = [cat(&p, &[5, 0, 0]), cat(&p, &[6]), vec![9, 0], vec![0, 0]];
        let (mut q, _rx) = queue_of(&seqs);
        let b = take_batch(&mut q, &budget_300_sharing_64());
        let packed = pack(&b, Some(64), &spec(Some(0))).unwrap();
        assert_eq!(packed.groups, 1, "the two 70-token prefixes are computed once");
        let lens: Vec<usize> = (0..packed.batch.len()).map(|i| packed.batch.item_len(i)).collect();
        let mut by_job = vec![0; lens.len()];
        for (k, &j) in packed.order.iter().enumerate() {
            by_job[j] = lens[k];
        }
        // Read at the rightmost non-pad token; a sequence of pads only is read at its first.
        assert_eq!(by_job, [71, 71, 1, 1]);
        let unpadded = pack(&b, Some(64), &spec(None)).unwrap();
        let mut lens: Vec<usize> = (0..unpadded.batch.len()).map(|i| unpadded.batch.item_len(i)).collect();
        lens.sort();
        assert_eq!(lens, [2, 2, 71, 73], "without a pad id every item reads its last token");
    }

    fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
        [a, b].concat()
    }

    /// A 300-token budget, sharing prefixes of 64 tokens and more.
    fn budget_300_sharing_64() -> BatchConfig {
        BatchConfig { max_batch_tokens: 300, max_batch_requests: 100, queue_capacity: 100, shared_prefix_min: Some(64) }
    }

    #[test]
    fn the_budget_counts_a_shared_prefix_once() {
        let cfg = budget_300_sharing_64();
        let p = vec![7u32; 200];
        let seqs: Vec<Vec<u32>> = (0..4).map(|i| cat(&p, &[i; 20])).collect();
        let (mut q, _rx) = queue_of(&seqs);
        let b = take_batch(&mut q, &cfg);
        assert_eq!(b.len(), 4, "200 + 4 x 20 computed tokens fit 300");
        let packed = pack(&b, cfg.shared_prefix_min, &spec(None)).unwrap();
        assert_eq!((packed.batch.tokens().len(), packed.groups), (280, 1));
        let off = BatchConfig { shared_prefix_min: None, ..cfg };
        let (mut q, _rx) = queue_of(&seqs);
        assert_eq!(take_batch(&mut q, &off).len(), 1, "unshared, only one of 220 tokens fits");
        assert_eq!(pack(&b, None, &spec(None)).unwrap().batch.tokens().len(), 880);
    }

    #[test]
    fn sharers_may_pass_a_job_that_does_not_fit_but_only_once() {
        let cfg = budget_300_sharing_64();
        let p = vec![7u32; 200];
        let (b1, b2) = (vec![1u32; 250], vec![2u32; 250]);
        let (mut q, mut rxs) =
            queue_of(&[cat(&p, &[1; 20]), b1.clone(), b2.clone(), cat(&p, &[2; 20]), cat(&p, &[3; 20])]);
        let tokens = |b: Vec<Job>| b.iter().map(|j| j.ids.clone()).collect::<Vec<_>>();
        let first = tokens(take_batch(&mut q, &cfg));
        assert_eq!(first, [cat(&p, &[1; 20]), cat(&p, &[2; 20]), cat(&p, &[3; 20])], "the sharers pass b1 and b2");
        // y shares 100 tokens with b1: the next batch could take it ahead of b2, but b2 has
        // already been passed over once.
        let y = cat(&b1[..100], &[3; 10]);
        let (job, rx) = Job::new(y.clone(), None);
        q.push_back(job);
        rxs.push(rx);
        assert_eq!(tokens(take_batch(&mut q, &cfg)), [b1]);
        assert_eq!(tokens(take_batch(&mut q, &cfg)), [b2]);
        assert_eq!(tokens(take_batch(&mut q, &cfg)), [y]);
    }
}
