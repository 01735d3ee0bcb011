//! The dispatch planner: from a span's layout (its views and the tensors in them) and a few
//! numbers of the device to the dispatches that update it. Pure: it sees no device, so its
//! invariants are checked here, on thousands of random layouts, rather than trusted to a GPU
//! test (a forgiving driver can hide an out-of-window read).
//!
//! It owns: chunking at the binding limit, binding offsets and alignment, the choice of vec4,
//! vec2 or scalar width, the per-dispatch `Chunk` numbers, segment rows and workgroup hints;
//! with q8 state, the blockwise plan instead ([`plan_blocks`]: a workgroup per 256-element
//! block, checked by [`check_blocks`]). It may not touch wgpu: [`crate::optimizer`] turns each
//! [`Planned`] into buffers and bind groups.
//!
//! Invariants ([`check`] asserts them on every plan, the tests by emulating the shader):
//! - every element of every tensor is updated exactly once, in its tensor's group;
//! - no element outside a tensor is changed (vec4 lanes past a tensor's end are written back
//!   unchanged);
//! - param, grad and state indices of an invocation name the same element;
//! - a segmented dispatch has at most `max_hints` workgroups: its hints fit the shader's window;
//! - binding offsets are multiples of the alignment; vec4 only where param, grad and every
//!   tensor start at a multiple of 4 elements; every index fits in u32;
//! - with 16-bit storage (`pairs`), no two invocations write one 32-bit word: vec4 and vec2
//!   dispatches cover whole words, and a scalar dispatch holds a single element, the last of
//!   an odd-length span, whose word's other half lies past the span.

use crate::dtype::q8::{BLOCK, BLOCK_WORDS};
use crate::protocol::{
    BLOCK_INVOCATIONS, Chunk, GROUP_BITS, SEGMENT_ROW, Storage, WHOLE_BLOCK, Width,
};

/// One tensor of a span: elements `start..end` (relative to the span's views), in `group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Segment {
    pub start: u64,
    pub end: u64,
    pub group: u32,
}

/// A contiguous range of param and grad elements, with its tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpanLayout<'a> {
    /// Where the views start in their buffers, in elements of their dtypes.
    pub param_offset: u64,
    pub grad_offset: u64,
    /// Bytes per element of the param and grad buffers (4, or 2 for 16-bit dtypes).
    pub param_bytes: u64,
    pub grad_bytes: u64,
    /// Elements in each view.
    pub len: u64,
    /// Sorted, disjoint, non-empty and inside `0..len`.
    pub segments: &'a [Segment],
}

/// The numbers of the device and the options that shape a plan.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanLimits {
    /// Elements bound per chunk at most: a multiple of [`granularity`].
    pub chunk_len: u64,
    /// Storage binding offsets are multiples of this many bytes (a multiple of 16).
    pub align: u64,
    /// Some buffer holds 16-bit values, two per word: invocations take whole words (vec4 or
    /// vec2), and only a span's last element of an odd length goes alone (scalar).
    pub pairs: bool,
    /// Bytes per element of the narrowest buffer (state included): chunks start where every
    /// buffer's binding offset can be aligned.
    pub min_bytes: u64,
    /// Invocations per workgroup of a one-tensor dispatch and of a segmented one.
    pub workgroup_size: u32,
    pub segmented_workgroup_size: u32,
    /// Hints the shader's window holds: the most workgroups of a segmented dispatch.
    pub max_hints: u64,
}

/// What one dispatch binds and updates.
#[derive(Clone, Debug)]
pub(crate) struct Planned {
    pub width: Width,
    /// Several tensors, or one that does not cover the dispatch: the shader reads the hints.
    pub segmented: bool,
    pub workgroup_size: u32,
    /// The dispatch's numbers; `segments` is left 0 for the caller, who places `rows` in the
    /// shared table.
    pub chunk: Chunk,
    /// The chunk's segments as (start, end, group, 0), relative to the chunk's first element.
    pub rows: Vec<[u32; SEGMENT_ROW]>,
    /// One per workgroup of a segmented dispatch.
    pub hints: Vec<u32>,
    /// (byte offset, byte size) of the param and grad bindings.
    pub param: (u64, u64),
    pub grad: (u64, u64),
    /// (first element, elements) of the state bindings: the chunk's range of the span, bound
    /// at `first * bytes` in each state buffer (aligned: chunks start at multiples of the
    /// granularity).
    pub state: (u64, u64),
    /// Blockwise (q8) dispatches: (first block, blocks) of the q8 state bindings, bound at
    /// `first * BLOCK_WORDS * 4` bytes (aligned); (0, 0) otherwise.
    pub q8: (u64, u64),
}

impl Planned {
    /// Workgroups of the dispatch: one per block (blockwise), else per `workgroup_size`
    /// invocations.
    pub fn workgroups(&self) -> u64 {
        match self.width {
            Width::Blocks => self.chunk.count as u64,
            _ => (self.chunk.count as u64).div_ceil(self.workgroup_size as u64),
        }
    }
}

/// Chunk lengths are multiples of this many elements, so that every chunk's binding offset can
/// be aligned in buffers of `min_bytes` per element (the smallest dtype in use) and vec4
/// chunks stay vec4: `align / min_bytes`, at least 4.
pub(crate) fn granularity(align: u64, min_bytes: u64) -> u64 {
    (align / min_bytes).max(4)
}

/// The unit of chunk lengths for `storage`: [`block_granularity`] with q8 state, else
/// [`granularity`] of its narrowest buffer.
pub(crate) fn chunk_unit(align: u64, storage: &Storage) -> u64 {
    if storage.blockwise() {
        block_granularity(align)
    } else {
        granularity(align, storage.min_bytes())
    }
}

/// Whether the span's views and tensors start at multiples of `lanes` elements.
fn lanes_aligned(span: &SpanLayout, lanes: u64) -> bool {
    span.param_offset.is_multiple_of(lanes)
        && span.grad_offset.is_multiple_of(lanes)
        && span.segments.iter().all(|s| s.start % lanes == 0)
}

/// A binding of `bytes`-per-element elements starting at byte `offset`, `base + len` elements
/// long: its size in bytes, whole words (storage bindings are multiples of 4 bytes).
pub(crate) fn binding_size(base: u64, len: u64, bytes: u64) -> u64 {
    ((base + len) * bytes).next_multiple_of(4)
}

/// The dispatches that update `span`. Each chunk of at most `chunk_len` elements becomes a
/// vec4 dispatch over its body (when aligned) and a scalar one over the rest; a dispatch that
/// one tensor covers whole needs no table, others are segmented and get a hint per workgroup.
pub(crate) fn plan_span(span: &SpanLayout, limits: &PlanLimits) -> Vec<Planned> {
    let granularity = granularity(limits.align, limits.min_bytes);
    // A span that is not exactly one tensor may be dispatched segmented (several tensors,
    // padding, a tensor at an offset): its chunks must fit the hint window.
    let one_tensor = matches!(span.segments, [s] if s.start == 0 && s.end == span.len);
    let chunk_len = if one_tensor {
        limits.chunk_len
    } else {
        let lanes = if lanes_aligned(span, 4) {
            4
        } else if limits.pairs {
            2
        } else {
            1
        };
        let hinted = limits.max_hints * limits.segmented_workgroup_size as u64 * lanes;
        limits.chunk_len.min(hinted / granularity * granularity)
    };

    let mut out = Vec::new();
    if chunk_len == 0 {
        return out; // cannot happen with the real window; `check` reports the uncovered span
    }
    let mut start = 0;
    while start < span.len {
        let len = chunk_len.min(span.len - start);
        let end = start + len;
        // This chunk's segments, relative to its start.
        let overlapping: Vec<&Segment> = span
            .segments
            .iter()
            .filter(|s| s.start < end && s.end > start)
            .collect();
        let local: Vec<Segment> = overlapping
            .iter()
            .map(|s| Segment {
                start: s.start.max(start) - start,
                end: s.end.min(end) - start,
                group: s.group,
            })
            .collect();
        // (binding offset in bytes, first element within the binding)
        let bind = |view_offset: u64, bytes: u64| {
            let byte = (view_offset + start) * bytes;
            let offset = byte / limits.align * limits.align;
            (offset, (byte - offset) / bytes)
        };
        let (param_offset, param_base) = bind(span.param_offset, span.param_bytes);
        let (grad_offset, grad_base) = bind(span.grad_offset, span.grad_bytes);
        let aligned = |lanes: u64| {
            param_base % lanes == 0
                && grad_base % lanes == 0
                && local.iter().all(|s| s.start % lanes == 0)
        };
        // vec4 over the body; with pairs, vec2 over the rest's whole words (tensors start on
        // words there: `params.rs` refuses others); scalar over what remains.
        let body = if aligned(4) { len / 4 * 4 } else { 0 };
        let words = if limits.pairs && aligned(2) {
            body + (len - body) / 2 * 2
        } else {
            body
        };
        // (start, end, group, the index within its tensor of the row's first element).
        let rows: Vec<[u32; SEGMENT_ROW]> = overlapping
            .iter()
            .zip(&local)
            .map(|(s, l)| {
                let into = start.max(s.start) - s.start;
                [l.start as u32, l.end as u32, l.group, into as u32]
            })
            .collect();
        for (width, first, count) in [
            (Width::Vec4, 0, body),
            (Width::Vec2, body, words - body),
            (Width::Scalar, words, len - words),
        ] {
            // Nothing to do where no segment overlaps [first, first + count).
            if count == 0
                || !local
                    .iter()
                    .any(|s| s.start < first + count && s.end > first)
            {
                continue;
            }
            let lanes = width.lanes();
            let single = local
                .iter()
                .find(|s| s.start <= first && s.end >= first + count);
            let workgroup_size = match single {
                Some(_) => limits.workgroup_size,
                None => limits.segmented_workgroup_size,
            };
            let hints = match single {
                Some(_) => Vec::new(),
                None => hints(&local, first, count, lanes, workgroup_size),
            };
            out.push(Planned {
                width,
                segmented: single.is_none(),
                workgroup_size,
                chunk: Chunk {
                    count: (count / lanes) as u32,
                    param_base: ((param_base + first) / lanes) as u32,
                    grad_base: ((grad_base + first) / lanes) as u32,
                    state_base: (first / lanes) as u32,
                    first_element: first as u32,
                    segments: 0,
                    segment_count: local.len() as u32,
                    group: single.map_or(0, |s| s.group),
                    // The chunk's element 0 as an index within the one tensor (wrapping).
                    tensor_element: single.map_or(0, |s| {
                        let row = rows
                            .iter()
                            .find(|r| r[0] as u64 == s.start)
                            .expect("its row");
                        row[3].wrapping_sub(row[0])
                    }),
                    ..Chunk::default()
                },
                rows: rows.clone(),
                hints,
                param: (
                    param_offset,
                    binding_size(param_base, len, span.param_bytes),
                ),
                grad: (grad_offset, binding_size(grad_base, len, span.grad_bytes)),
                state: (start, len),
                q8: (0, 0),
            });
        }
        start = end;
    }
    out
}

/// The chunk unit of blockwise (q8) plans, in elements: a chunk binds whole blocks, so it
/// must hold a block with its alignment slack in every binding (64 times the alignment:
/// 16,384 elements at wgpu's default 256 bytes).
pub(crate) fn block_granularity(align: u64) -> u64 {
    64 * align
}

/// Blocks per aligned q8 binding offset: a block is `BLOCK_WORDS * 4 = 260` bytes (65 words,
/// odd), so offsets are aligned at multiples of `align / 4` blocks.
fn block_alignment(align: u64) -> u64 {
    (align / 4).max(1)
}

/// Every tensor's q8 blocks in the span's order: (start, end, group, index within the tensor
/// of start), relative to the span's views; block `k` of the list is block `k` of the span's
/// q8 buffers.
pub(crate) fn span_blocks(segments: &[Segment]) -> Vec<[u64; 4]> {
    let block = BLOCK as u64;
    segments
        .iter()
        .flat_map(|s| {
            (s.start..s.end)
                .step_by(BLOCK)
                .map(move |b| [b, (b + block).min(s.end), s.group as u64, b - s.start])
        })
        .collect()
}

/// The dispatches that update `span` block by block (with q8 state): one workgroup of
/// [`BLOCK_INVOCATIONS`] per block of 256 elements of one tensor, each invocation four
/// consecutive elements. A chunk is a run of blocks whose elements (from an aligned start)
/// and q8 blocks (from an aligned block) fit `chunk_len` elements and `chunk_len * 4` bytes.
pub(crate) fn plan_blocks(span: &SpanLayout, limits: &PlanLimits) -> Vec<Planned> {
    let granularity = granularity(limits.align, limits.min_bytes);
    let q8_align = block_alignment(limits.align);
    let blocks = span_blocks(span.segments);
    let mut out = Vec::new();
    let mut b = 0;
    while b < blocks.len() {
        // The chunk's origin: its first block's start, aligned down in every state buffer.
        let origin = blocks[b][0] / granularity * granularity;
        let q8_first = b as u64 / q8_align * q8_align;
        let fits = |e: usize| {
            blocks[e][1] - origin <= limits.chunk_len
                && (e as u64 + 1 - q8_first) * BLOCK_WORDS as u64 * 4 <= limits.chunk_len * 4
        };
        let mut e = b;
        while e < blocks.len() && fits(e) {
            e += 1;
        }
        if e == b {
            return out; // chunk_len under the block unit; `check_blocks` reports the gap
        }
        let len = blocks[e - 1][1] - origin;
        let bind = |view_offset: u64, bytes: u64| {
            let byte = (view_offset + origin) * bytes;
            let offset = byte / limits.align * limits.align;
            (offset, (byte - offset) / bytes)
        };
        let (param_offset, param_base) = bind(span.param_offset, span.param_bytes);
        let (grad_offset, grad_base) = bind(span.grad_offset, span.grad_bytes);
        let rows: Vec<[u32; SEGMENT_ROW]> = blocks[b..e]
            .iter()
            .map(|r| {
                [
                    (r[0] - origin) as u32,
                    (r[1] - origin) as u32,
                    r[2] as u32,
                    r[3] as u32,
                ]
            })
            .collect();
        out.push(Planned {
            width: Width::Blocks,
            segmented: false,
            workgroup_size: BLOCK_INVOCATIONS,
            chunk: Chunk {
                count: (e - b) as u32,
                param_base: param_base as u32,
                grad_base: grad_base as u32,
                segment_count: (e - b) as u32,
                block_base: (b as u64 - q8_first) as u32,
                ..Chunk::default()
            },
            rows,
            hints: Vec::new(),
            param: (
                param_offset,
                binding_size(param_base, len, span.param_bytes),
            ),
            grad: (grad_offset, binding_size(grad_base, len, span.grad_bytes)),
            state: (origin, len),
            q8: (q8_first, e as u64 - q8_first),
        });
        b = e;
    }
    out
}

/// Checks a blockwise plan: every tensor's blocks, in order, each in exactly one dispatch at
/// its place in the span's q8 buffers; bindings aligned, inside `chunk_len`, lined up with the
/// chunk's origin; 16-bit words whole (blocks start on even elements). `Err` names the first
/// broken invariant.
pub(crate) fn check_blocks(
    span: &SpanLayout,
    limits: &PlanLimits,
    plans: &[Planned],
) -> Result<(), String> {
    let blocks = span_blocks(span.segments);
    let q8_align = block_alignment(limits.align);
    let mut next = 0u64; // the span's next block
    for (k, d) in plans.iter().enumerate() {
        let fail = |what: &str| Err(format!("blockwise dispatch {k}: {what} ({d:?})"));
        let c = &d.chunk;
        let (origin, len) = d.state;
        let (q8_first, q8_len) = d.q8;
        if d.width != Width::Blocks || d.workgroup_size != BLOCK_INVOCATIONS {
            return fail("not a blockwise dispatch");
        }
        if len > limits.chunk_len || q8_len * BLOCK_WORDS as u64 * 4 > limits.chunk_len * 4 {
            return fail("chunk longer than chunk_len");
        }
        if !origin.is_multiple_of(granularity(limits.align, limits.min_bytes))
            || !q8_first.is_multiple_of(q8_align)
            || !(q8_first * BLOCK_WORDS as u64 * 4).is_multiple_of(limits.align)
        {
            return fail("state binding not aligned");
        }
        if q8_first + c.block_base as u64 != next
            || c.block_base as u64 + c.count as u64 != q8_len
            || d.rows.len() != c.count as usize
            || c.segment_count != c.count
        {
            return fail("blocks out of order, or q8 binding not lined up");
        }
        for (view_offset, bytes, (offset, size), base) in [
            (span.param_offset, span.param_bytes, d.param, c.param_base),
            (span.grad_offset, span.grad_bytes, d.grad, c.grad_base),
        ] {
            let origin_byte = (view_offset + origin) * bytes;
            if offset % limits.align != 0
                || offset + base as u64 * bytes != origin_byte
                || offset + size != (origin_byte + len * bytes).next_multiple_of(4)
            {
                return fail("param or grad binding does not line up with the chunk");
            }
        }
        for (i, row) in d.rows.iter().enumerate() {
            let want = blocks.get(next as usize + i);
            let got = [
                row[0] as u64 + origin,
                row[1] as u64 + origin,
                row[2] as u64,
                row[3] as u64,
            ];
            if want != Some(&got) || row[1] as u64 > len || row[1] <= row[0] {
                return fail(&format!("block {i} is {got:?}, not {want:?}"));
            }
            if row[1] - row[0] > BLOCK as u32 {
                return fail("a block longer than 256 elements");
            }
            // Whole words: a 16-bit buffer's block starts on an even element.
            if limits.pairs
                && (!(span.param_offset + got[0]).is_multiple_of(2)
                    || !(span.grad_offset + got[0]).is_multiple_of(2))
            {
                return fail("a block starts inside a 16-bit word");
            }
        }
        next += c.count as u64;
    }
    if next != blocks.len() as u64 {
        return Err(format!(
            "{} of {} blocks are in no dispatch",
            blocks.len() as u64 - next,
            blocks.len()
        ));
    }
    Ok(())
}

/// For each workgroup of a segmented dispatch over `first..first + count` of a chunk:
/// `WHOLE_BLOCK | segment << GROUP_BITS | group` when one segment holds all of its elements
/// (the shader's fast path), else the first segment that ends past its first element.
fn hints(local: &[Segment], first: u64, count: u64, lanes: u64, workgroup_size: u32) -> Vec<u32> {
    let per_block = workgroup_size as u64 * lanes;
    let mut s = 0;
    (0..(count / lanes).div_ceil(workgroup_size as u64))
        .map(|b| {
            let e = first + b * per_block;
            let block_end = (e + per_block).min(first + count);
            while s + 1 < local.len() && local[s].end <= e {
                s += 1;
            }
            if local[s].start <= e && local[s].end >= block_end {
                WHOLE_BLOCK | (s as u32) << GROUP_BITS | local[s].group
            } else {
                s as u32
            }
        })
        .collect()
}

/// Checks a plan's invariants that need no element-by-element walk (see the module docs):
/// windows, alignment, widths, index ranges, and that the dispatches' ranges are disjoint and
/// cover every tensor. `Err` names the first broken one; a planner bug, never the user's.
pub(crate) fn check(
    span: &SpanLayout,
    limits: &PlanLimits,
    plans: &[Planned],
) -> Result<(), String> {
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (k, d) in plans.iter().enumerate() {
        let fail = |what: &str| Err(format!("dispatch {k}: {what} ({d:?})"));
        let lanes = d.width.lanes();
        let c = &d.chunk;
        let (chunk_start, chunk_len) = d.state;
        let (first, count) = (c.first_element as u64, c.count as u64 * lanes);
        if first + count > chunk_len || chunk_start + chunk_len > span.len {
            return fail("range outside its chunk or span");
        }
        if chunk_len > limits.chunk_len {
            return fail("chunk longer than chunk_len");
        }
        if chunk_start % granularity(limits.align, limits.min_bytes) != 0 {
            return fail("state binding not aligned in the narrowest state buffer");
        }
        for (view_offset, bytes, (offset, size), base) in [
            (span.param_offset, span.param_bytes, d.param, c.param_base),
            (span.grad_offset, span.grad_bytes, d.grad, c.grad_base),
        ] {
            if offset % limits.align != 0 {
                return fail("binding offset not aligned");
            }
            // The binding starts at or below the chunk and ends at the chunk's end (in whole
            // words), inside the view's words.
            let chunk_byte = (view_offset + chunk_start) * bytes;
            if offset > chunk_byte
                || offset + size != (chunk_byte + chunk_len * bytes).next_multiple_of(4)
                || (offset + base as u64 * lanes * bytes) != chunk_byte + first * bytes
            {
                return fail("binding does not line up with the chunk");
            }
        }
        if c.state_base as u64 * lanes != first {
            return fail("state index does not line up with the chunk");
        }
        if lanes > 1
            && (first % lanes != 0
                || count % lanes != 0
                || d.rows.iter().any(|r| !(r[0] as u64).is_multiple_of(lanes)))
        {
            return fail("vec4 or vec2 where not aligned");
        }
        if d.width == Width::Vec2 && !limits.pairs {
            return fail("vec2 without 16-bit storage");
        }
        // With pairs, a scalar dispatch is a span's last element, alone in its word.
        if limits.pairs
            && d.width == Width::Scalar
            && (count != 1
                || chunk_start + first + 1 != span.len
                || (chunk_start + first) % 2 != 0
                || !span.param_offset.is_multiple_of(2)
                || !span.grad_offset.is_multiple_of(2))
        {
            return fail("a scalar dispatch would share a word with another invocation");
        }
        if d.rows.len() as u64 >= 1 << (31 - GROUP_BITS) {
            return fail("too many segments for a whole-block hint");
        }
        if d.segmented {
            let blocks = (count / lanes).div_ceil(d.workgroup_size as u64);
            if d.hints.len() as u64 != blocks || blocks > limits.max_hints {
                return fail("hints do not fit the window");
            }
        } else if !d
            .rows
            .iter()
            .any(|r| r[0] as u64 <= first && r[1] as u64 >= first + count && r[2] == c.group)
        {
            return fail("one-tensor dispatch not inside its tensor");
        }
        if d.rows.len() != c.segment_count as usize {
            return fail("segment count");
        }
        covered.push((chunk_start + first, chunk_start + first + count));
    }
    // Disjoint, and every tensor element inside one of them.
    covered.sort();
    if covered.windows(2).any(|w| w[0].1 > w[1].0) {
        return Err(format!("dispatch ranges overlap: {covered:?}"));
    }
    for s in span.segments {
        let mut at = s.start;
        for &(a, b) in &covered {
            if a <= at && b > at {
                at = b;
            }
        }
        if at < s.end {
            return Err(format!("element {at} of segment {s:?} is in no dispatch"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// What the shader does to each element of a span's param view, emulated from a plan
    /// exactly as `shaders/adam_family.wgsl` reads it: `Some(group)` for an element updated in
    /// that group, `None` for one never written or written back unchanged. Errors on a hint
    /// read past the window, an update of the same element twice, or param, grad and state
    /// indices that disagree.
    fn emulate(
        span: &SpanLayout,
        limits: &PlanLimits,
        plans: &[Planned],
    ) -> Result<Vec<Option<u32>>, String> {
        let mut updated: Vec<Option<u32>> = vec![None; span.len as usize];
        // With pairs: which invocation (dispatch, index) writes each word of the span.
        let mut writer: Vec<Option<(usize, u64)>> = vec![None; span.len.div_ceil(2) as usize];
        for (k, d) in plans.iter().enumerate() {
            let c = &d.chunk;
            let lanes = d.width.lanes();
            let wg = d.workgroup_size as u64;
            let chunk_start = d.state.0;
            for i in 0..c.count as u64 {
                let block = i / wg;
                let e = c.first_element as u64 + i * lanes;
                let mut group = c.group;
                let mut end = u32::MAX as u64;
                // The index within its tensor of lane 0, as the shader computes it.
                let mut index = c.tensor_element.wrapping_add(e as u32);
                if d.segmented {
                    if block >= limits.max_hints {
                        return Err(format!("dispatch {k}: hint {block} read past the window"));
                    }
                    let hint = d.hints[block as usize];
                    let s = if hint & WHOLE_BLOCK != 0 {
                        group = hint & ((1 << GROUP_BITS) - 1);
                        ((hint & !WHOLE_BLOCK) >> GROUP_BITS) as usize
                    } else {
                        let mut s = hint as usize;
                        while s + 1 < d.rows.len() && d.rows[s][1] as u64 <= e {
                            s += 1;
                        }
                        end = d.rows[s][1] as u64;
                        if e < d.rows[s][0] as u64 || e >= end {
                            continue;
                        }
                        group = d.rows[s][2];
                        s
                    };
                    let row = d
                        .rows
                        .get(s)
                        .ok_or(format!("dispatch {k}: no segment {s}"))?;
                    index = (e as u32).wrapping_sub(row[0]).wrapping_add(row[3]);
                }
                for lane in 0..lanes {
                    // The element each binding's index names, relative to the span's views.
                    let at = |(offset, _): (u64, u64), base: u32, view_offset: u64, bytes: u64| {
                        (offset / bytes + (base as u64 + i) * lanes + lane).checked_sub(view_offset)
                    };
                    let p = at(d.param, c.param_base, span.param_offset, span.param_bytes);
                    let g = at(d.grad, c.grad_base, span.grad_offset, span.grad_bytes);
                    let s = Some(chunk_start + (c.state_base as u64 + i) * lanes + lane);
                    if p != g || p != s {
                        return Err(format!(
                            "dispatch {k}: param {p:?}, grad {g:?}, state {s:?}"
                        ));
                    }
                    let p = p.unwrap();
                    if p >= span.len {
                        return Err(format!("dispatch {k}: element {p} past the view"));
                    }
                    if limits.pairs {
                        let w = &mut writer[(p / 2) as usize];
                        if w.is_some_and(|w| w != (k, i)) {
                            return Err(format!(
                                "word {} written by {w:?} and {:?}",
                                p / 2,
                                (k, i)
                            ));
                        }
                        *w = Some((k, i));
                    }
                    // Lanes past the segment's end are written back unchanged.
                    if !d.segmented || e + lane < end {
                        if let Some(g) = updated[p as usize] {
                            return Err(format!("element {p} updated twice (group {g})"));
                        }
                        updated[p as usize] = Some(group);
                        // Stochastic rounding's index: the element's place in its tensor.
                        let tensor = span.segments.iter().find(|t| t.start <= p && p < t.end);
                        let want = tensor.map(|t| (p - t.start) as u32);
                        if want != Some(index.wrapping_add(lane as u32)) {
                            return Err(format!(
                                "dispatch {k}: element {p} has index {} in its tensor, not {want:?}",
                                index.wrapping_add(lane as u32)
                            ));
                        }
                    }
                }
            }
        }
        Ok(updated)
    }

    /// The expected result: each tensor's elements in its group, nothing else.
    fn expected(span: &SpanLayout) -> Vec<Option<u32>> {
        let mut want = vec![None; span.len as usize];
        for s in span.segments {
            want[s.start as usize..s.end as usize].fill(Some(s.group));
        }
        want
    }

    fn verify(span: &SpanLayout, limits: &PlanLimits) -> Result<(), String> {
        let plans = plan_span(span, limits);
        check(span, limits, &plans)?;
        let got = emulate(span, limits, &plans)?;
        match got.iter().zip(expected(span)).position(|(g, w)| *g != w) {
            None => Ok(()),
            Some(i) => Err(format!(
                "element {i}: got {:?}, want {:?}",
                got[i],
                expected(span)[i]
            )),
        }
    }

    /// A random layout: 1 to `max_tensors` tensors (some empty), gaps, padding, offsets,
    /// lengths aligned to 4 or not, up to `groups` groups. With `pairs`, views and tensors start
    /// on words (even elements), as `params.rs` requires of 16-bit storage.
    fn random_span(
        rng: &mut Rng,
        max_tensors: u64,
        max_len: u64,
        pairs: bool,
    ) -> (u64, u64, u64, Vec<Segment>) {
        let aligned = rng.below(2) == 0;
        let step = if aligned {
            4
        } else if pairs {
            2
        } else {
            1
        };
        let offset = |rng: &mut Rng| rng.below(40) / step * step;
        let (param_offset, grad_offset) = (offset(rng), offset(rng));
        let groups = 1 + rng.below(16) as u32;
        let mut segments = Vec::new();
        let mut at = offset(rng) * rng.below(2);
        for _ in 0..1 + rng.below(max_tensors) {
            let len = match rng.below(4) {
                0 => rng.below(8),
                1 => rng.below(300),
                _ => rng.below(max_len),
            };
            if len > 0 {
                segments.push(Segment {
                    start: at,
                    end: at + len,
                    group: rng.below(groups as u64) as u32,
                });
            }
            at += len;
            // A gap, sometimes, keeping the alignment the span has.
            if rng.below(3) == 0 {
                at += offset(rng);
            }
            at = at.next_multiple_of(step);
        }
        let len = at + rng.below(4) * rng.below(2);
        (param_offset, grad_offset, len.max(1), segments)
    }

    fn random_limits(rng: &mut Rng, pairs: bool) -> PlanLimits {
        let align = [16u64, 64, 256][rng.below(3) as usize];
        let workgroup_size = [1u32, 3, 64, 256][rng.below(4) as usize];
        let segmented_workgroup_size = workgroup_size.min(64);
        let min_bytes = if pairs { 2 } else { 4 };
        let granularity = granularity(align, min_bytes);
        PlanLimits {
            chunk_len: granularity * (1 + rng.below(64)),
            align,
            pairs,
            min_bytes,
            workgroup_size,
            segmented_workgroup_size,
            // Small windows, so that the hint cap is exercised without huge spans; still
            // one chunk of `granularity` scalar elements must fit (the real window, 16,384
            // hints, holds 64 times the largest granularity).
            max_hints: granularity.div_ceil(segmented_workgroup_size as u64) + rng.below(8),
        }
    }

    #[test]
    fn random_layouts_keep_every_invariant() {
        let mut rng = Rng::new(0x91a2);
        for case in 0..4000 {
            // Every storage: f32 throughout, or 16-bit somewhere (params, grads, or only the
            // state, which the planner sees through `pairs` and `min_bytes`).
            let pairs = rng.below(2) == 0;
            let limits = random_limits(&mut rng, pairs);
            let max_tensors = 1 + rng.below(300);
            let (param_offset, grad_offset, len, segments) =
                random_span(&mut rng, max_tensors, 3000, pairs);
            let bytes = |rng: &mut Rng| if pairs && rng.below(2) == 0 { 2 } else { 4 };
            let span = SpanLayout {
                param_offset,
                grad_offset,
                param_bytes: bytes(&mut rng),
                grad_bytes: bytes(&mut rng),
                len,
                segments: &segments,
            };
            verify(&span, &limits)
                .unwrap_or_else(|e| panic!("case {case}: {e}\nspan {span:?}\nlimits {limits:?}"));
        }
    }

    #[test]
    fn the_default_window_holds_at_large_sizes() {
        // Wgpu's defaults: 128 MiB bindings (chunks of 32M elements), 256-byte alignment, the
        // 16,384-hint window. A single tensor with padding past 4M elements used to be one
        // segmented chunk with more workgroups than hints.
        let limits = PlanLimits {
            chunk_len: 32 << 20,
            align: 256,
            pairs: false,
            min_bytes: 4,
            workgroup_size: 256,
            segmented_workgroup_size: 64,
            max_hints: crate::protocol::MAX_HINTS,
        };
        let n = 5 << 20;
        for (offset, len, pad) in [(0, n, 4), (64, n, 0), (0, n + 3, 1), (0, n, 0)] {
            for aligned_view in [0, 1] {
                let segments = [Segment {
                    start: offset,
                    end: offset + len,
                    group: 1,
                }];
                let span = SpanLayout {
                    param_offset: aligned_view,
                    grad_offset: 0,
                    param_bytes: 4,
                    grad_bytes: 4,
                    len: offset + len + pad,
                    segments: &segments,
                };
                let plans = plan_span(&span, &limits);
                check(&span, &limits, &plans)
                    .unwrap_or_else(|e| panic!("{offset} {len} {pad} {aligned_view}: {e}"));
            }
        }
        // Many tensors, some larger than a window.
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            let pairs = rng.below(2) == 0;
            let (param_offset, grad_offset, len, segments) =
                random_span(&mut rng, 40, 3 << 20, pairs);
            let limits = PlanLimits {
                pairs,
                min_bytes: if pairs { 2 } else { 4 },
                ..limits
            };
            let span = SpanLayout {
                param_offset,
                grad_offset,
                param_bytes: if pairs { 2 } else { 4 },
                grad_bytes: 4,
                len,
                segments: &segments,
            };
            let plans = plan_span(&span, &limits);
            check(&span, &limits, &plans).unwrap();
        }
    }

    #[test]
    fn check_catches_a_broken_plan() {
        // The checker itself must be able to fail: break good plans one way at a time.
        let segments = [
            Segment {
                start: 0,
                end: 1000,
                group: 0,
            },
            Segment {
                start: 1000,
                end: 1500,
                group: 1,
            },
        ];
        let span = SpanLayout {
            param_offset: 0,
            grad_offset: 0,
            param_bytes: 4,
            grad_bytes: 4,
            len: 1600,
            segments: &segments,
        };
        let limits = PlanLimits {
            chunk_len: 1024,
            align: 16,
            pairs: false,
            min_bytes: 4,
            workgroup_size: 8,
            segmented_workgroup_size: 8,
            max_hints: 16,
        };
        let good = plan_span(&span, &limits);
        fn segmented(p: &mut [Planned]) -> &mut Planned {
            p.iter_mut()
                .find(|d| d.segmented)
                .expect("a segmented dispatch")
        }
        check(&span, &limits, &good).unwrap();
        let breaks: [fn(&mut Vec<Planned>); 5] = [
            |p| drop(p.pop()),                      // a chunk missing
            |p| p[0].chunk.count -= 1,              // a dispatch too short
            |p| p[0].param.0 += 16,                 // binding moved
            |p| segmented(p).hints.extend([0; 40]), // window overflow
            |p| p[0].chunk.state_base += 1,         // state off by one
        ];
        for (k, b) in breaks.iter().enumerate() {
            let mut plans = good.clone();
            b(&mut plans);
            let caught = check(&span, &limits, &plans).is_err()
                || emulate(&span, &limits, &plans)
                    .map(|u| u != expected(&span))
                    .unwrap_or(true);
            assert!(caught, "break {k} went unnoticed");
        }
    }

    /// What a blockwise plan does to each element, emulated as `step_blocks` reads it:
    /// `Some(group)` per updated element; errors on an element updated twice, indices that
    /// disagree, or a q8 code placed anywhere but at its block and slot.
    fn emulate_blocks(span: &SpanLayout, plans: &[Planned]) -> Result<Vec<Option<u32>>, String> {
        let mut updated: Vec<Option<u32>> = vec![None; span.len as usize];
        // Each tensor's blocks in span order: where element p's code must go.
        let starts: Vec<u64> = span_blocks(span.segments).iter().map(|b| b[0]).collect();
        for (k, d) in plans.iter().enumerate() {
            let c = &d.chunk;
            let (origin, _) = d.state;
            for (i, row) in d.rows.iter().enumerate() {
                let block = d.q8.0 + c.block_base as u64 + i as u64;
                for lane in 0..BLOCK_INVOCATIONS as u64 {
                    for j in 0..4 {
                        let e = row[0] as u64 + 4 * lane + j;
                        if e >= row[1] as u64 {
                            continue;
                        }
                        let at = |offset: u64, base: u32, view_offset: u64, bytes: u64| {
                            (offset / bytes + base as u64 + e).checked_sub(view_offset)
                        };
                        let p = at(d.param.0, c.param_base, span.param_offset, span.param_bytes);
                        let g = at(d.grad.0, c.grad_base, span.grad_offset, span.grad_bytes);
                        if p != g || p != Some(origin + e) {
                            return Err(format!("dispatch {k}: param {p:?}, grad {g:?}"));
                        }
                        let p = origin + e;
                        let tensor = span
                            .segments
                            .iter()
                            .find(|t| t.start <= p && p < t.end)
                            .ok_or(format!("dispatch {k}: element {p} in no tensor"))?;
                        let index = p - tensor.start;
                        if row[3] as u64 + 4 * lane + j != index {
                            return Err(format!("element {p}: index in its tensor"));
                        }
                        // Its code: block `index / 256` of its tensor, slot `index % 256`.
                        let want = starts.iter().position(|&s| s == p - index % BLOCK as u64);
                        if want != Some(block as usize) || 4 * lane + j != index % BLOCK as u64 {
                            return Err(format!(
                                "element {p}: code in block {block}, not {want:?}"
                            ));
                        }
                        if updated[p as usize].replace(row[2]).is_some() {
                            return Err(format!("element {p} updated twice"));
                        }
                    }
                }
            }
        }
        Ok(updated)
    }

    #[test]
    fn random_layouts_plan_whole_blocks() {
        let mut rng = Rng::new(0x98);
        for case in 0..1500 {
            let pairs = rng.below(2) == 0;
            let align = [16u64, 64, 256][rng.below(3) as usize];
            let min_bytes = [1, 2, 4][rng.below(3) as usize];
            let limits = PlanLimits {
                chunk_len: block_granularity(align) * (1 + rng.below(3)),
                align,
                pairs,
                min_bytes,
                workgroup_size: 256,
                segmented_workgroup_size: 64,
                max_hints: 0,
            };
            let max_len = [300, 3000, 20_000][rng.below(3) as usize];
            let max_tensors = 1 + rng.below(100);
            let (param_offset, grad_offset, len, segments) =
                random_span(&mut rng, max_tensors, max_len, pairs);
            let bytes = |rng: &mut Rng| if pairs && rng.below(2) == 0 { 2 } else { 4 };
            let span = SpanLayout {
                param_offset,
                grad_offset,
                param_bytes: bytes(&mut rng),
                grad_bytes: bytes(&mut rng),
                len,
                segments: &segments,
            };
            let plans = plan_blocks(&span, &limits);
            let context = format!("case {case}: span {span:?}\nlimits {limits:?}");
            check_blocks(&span, &limits, &plans).unwrap_or_else(|e| panic!("{e}\n{context}"));
            let got = emulate_blocks(&span, &plans).unwrap_or_else(|e| panic!("{e}\n{context}"));
            assert_eq!(got, expected(&span), "case {case}");
        }
    }

    #[test]
    fn check_blocks_catches_a_broken_plan() {
        let segments = [
            Segment {
                start: 0,
                end: 1000,
                group: 0,
            },
            Segment {
                start: 1000,
                end: 1500,
                group: 1,
            },
            Segment {
                start: 3000,
                end: 3001,
                group: 1,
            },
        ];
        let span = SpanLayout {
            param_offset: 0,
            grad_offset: 0,
            param_bytes: 4,
            grad_bytes: 4,
            len: 3004,
            segments: &segments,
        };
        let limits = PlanLimits {
            chunk_len: block_granularity(16),
            align: 16,
            pairs: false,
            min_bytes: 1,
            workgroup_size: 256,
            segmented_workgroup_size: 64,
            max_hints: 0,
        };
        let good = plan_blocks(&span, &limits);
        assert!(good.len() > 1, "several chunks");
        check_blocks(&span, &limits, &good).unwrap();
        let breaks: [fn(&mut Vec<Planned>); 5] = [
            |p| drop(p.pop()),              // blocks missing
            |p| p[0].chunk.block_base += 1, // codes in the wrong block
            |p| p[1].param.0 += 16,         // binding moved
            |p| p[0].rows[0][1] += 1,       // a block too long
            |p| p[0].q8.0 += 1,             // q8 binding not aligned
        ];
        for (k, b) in breaks.iter().enumerate() {
            let mut plans = good.clone();
            b(&mut plans);
            assert!(
                check_blocks(&span, &limits, &plans).is_err(),
                "break {k} went unnoticed"
            );
        }
        // A chunk_len under the unit cannot hold a block: reported, not planned wrong.
        let small = PlanLimits {
            chunk_len: 64,
            ..limits
        };
        assert!(check_blocks(&span, &small, &plan_blocks(&span, &small)).is_err());
    }
}
