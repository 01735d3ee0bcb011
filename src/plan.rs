//! The dispatch planner: from a span's layout (its views and the tensors in them) and a few
//! numbers of the device to the dispatches that update it. Pure: it sees no device, so its
//! invariants are checked here, on thousands of random layouts, rather than trusted to a GPU
//! test (a forgiving driver can hide an out-of-window read).
//!
//! It owns: chunking at the binding limit, binding offsets and alignment, the choice of vec4
//! or scalar width, the per-dispatch `Chunk` numbers, segment rows and workgroup hints. It may
//! not touch wgpu: [`crate::optimizer`] turns each [`Planned`] into buffers and bind groups.
//!
//! Invariants ([`check`] asserts them on every plan, the tests by emulating the shader):
//! - every element of every tensor is updated exactly once, in its tensor's group;
//! - no element outside a tensor is changed (vec4 lanes past a tensor's end are written back
//!   unchanged);
//! - param, grad and state indices of an invocation name the same element;
//! - a segmented dispatch has at most `max_hints` workgroups: its hints fit the shader's window;
//! - binding offsets are multiples of the alignment; vec4 only where param, grad and every
//!   tensor start 16-byte aligned; every index fits in u32.

use crate::protocol::{Chunk, SEGMENT_ROW, WHOLE_BLOCK, Width};

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
    /// Where the views start in their buffers, in f32 elements.
    pub param_offset: u64,
    pub grad_offset: u64,
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
    /// (byte offset, byte size) of the param, grad and state bindings.
    pub param: (u64, u64),
    pub grad: (u64, u64),
    pub state: (u64, u64),
}

/// Chunk lengths are multiples of this many elements, so that every chunk's binding offset can
/// be aligned and vec4 chunks stay vec4: `align / 4`, at least 4.
pub(crate) fn granularity(align: u64) -> u64 {
    (align / 4).max(4)
}

/// Whether the span's views and tensors allow vec4 loads: both views and every tensor start
/// at a multiple of 4 elements.
fn vec4_aligned(span: &SpanLayout) -> bool {
    span.param_offset.is_multiple_of(4)
        && span.grad_offset.is_multiple_of(4)
        && span.segments.iter().all(|s| s.start % 4 == 0)
}

/// The dispatches that update `span`. Each chunk of at most `chunk_len` elements becomes a
/// vec4 dispatch over its body (when aligned) and a scalar one over the rest; a dispatch that
/// one tensor covers whole needs no table, others are segmented and get a hint per workgroup.
pub(crate) fn plan_span(span: &SpanLayout, limits: &PlanLimits) -> Vec<Planned> {
    let granularity = granularity(limits.align);
    // A span that is not exactly one tensor may be dispatched segmented (several tensors,
    // padding, a tensor at an offset): its chunks must fit the hint window.
    let one_tensor = matches!(span.segments, [s] if s.start == 0 && s.end == span.len);
    let chunk_len = if one_tensor {
        limits.chunk_len
    } else {
        let lanes = if vec4_aligned(span) { 4 } else { 1 };
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
        let local: Vec<Segment> = span
            .segments
            .iter()
            .filter(|s| s.start < end && s.end > start)
            .map(|s| Segment {
                start: s.start.max(start) - start,
                end: s.end.min(end) - start,
                group: s.group,
            })
            .collect();
        // (binding offset in bytes, first element within the binding)
        let bind = |view_offset: u64| {
            let byte = (view_offset + start) * 4;
            let offset = byte / limits.align * limits.align;
            (offset, (byte - offset) / 4)
        };
        let (param_offset, param_base) = bind(span.param_offset);
        let (grad_offset, grad_base) = bind(span.grad_offset);
        let aligned =
            param_base % 4 == 0 && grad_base % 4 == 0 && local.iter().all(|s| s.start % 4 == 0);
        let body = if aligned { len / 4 * 4 } else { 0 };
        let rows: Vec<[u32; SEGMENT_ROW]> = local
            .iter()
            .map(|s| [s.start as u32, s.end as u32, s.group, 0])
            .collect();
        for (width, first, count) in [(Width::Vec4, 0, body), (Width::Scalar, body, len - body)] {
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
                    ..Chunk::default()
                },
                rows: rows.clone(),
                hints,
                param: (param_offset, (param_base + len) * 4),
                grad: (grad_offset, (grad_base + len) * 4),
                state: (start * 4, len * 4),
            });
        }
        start = end;
    }
    out
}

/// For each workgroup of a segmented dispatch over `first..first + count` of a chunk:
/// `WHOLE_BLOCK | group` when one segment holds all of its elements (the shader's fast path),
/// else the first segment that ends past its first element.
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
                WHOLE_BLOCK | local[s].group
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
        let chunk_start = d.state.0 / 4;
        let chunk_len = d.state.1 / 4;
        let (first, count) = (c.first_element as u64, c.count as u64 * lanes);
        if first + count > chunk_len || chunk_start + chunk_len > span.len {
            return fail("range outside its chunk or span");
        }
        if chunk_len > limits.chunk_len {
            return fail("chunk longer than chunk_len");
        }
        for (view_offset, (offset, size), base) in [
            (span.param_offset, d.param, c.param_base),
            (span.grad_offset, d.grad, c.grad_base),
        ] {
            if offset % limits.align != 0 {
                return fail("binding offset not aligned");
            }
            // The binding starts at or below the chunk and ends at the chunk's end, inside
            // the view.
            let chunk_byte = (view_offset + chunk_start) * 4;
            if offset > chunk_byte
                || offset + size != chunk_byte + chunk_len * 4
                || (offset + base as u64 * lanes * 4) != chunk_byte + first * 4
            {
                return fail("binding does not line up with the chunk");
            }
        }
        if c.state_base as u64 * lanes != first {
            return fail("state index does not line up with the chunk");
        }
        if d.width == Width::Vec4
            && (first % 4 != 0 || count % 4 != 0 || d.rows.iter().any(|r| r[0] % 4 != 0))
        {
            return fail("vec4 where not aligned");
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
        for (k, d) in plans.iter().enumerate() {
            let c = &d.chunk;
            let lanes = d.width.lanes();
            let wg = d.workgroup_size as u64;
            let chunk_start = d.state.0 / 4;
            for i in 0..c.count as u64 {
                let block = i / wg;
                let e = c.first_element as u64 + i * lanes;
                let mut group = c.group;
                let mut end = u32::MAX as u64;
                if d.segmented {
                    if block >= limits.max_hints {
                        return Err(format!("dispatch {k}: hint {block} read past the window"));
                    }
                    let hint = d.hints[block as usize];
                    if hint & WHOLE_BLOCK != 0 {
                        group = hint & !WHOLE_BLOCK;
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
                    }
                }
                for lane in 0..lanes {
                    // The element each binding's index names, relative to the span's views.
                    let at = |(offset, _): (u64, u64), base: u32, view_offset: u64| {
                        (offset / 4 + (base as u64 + i) * lanes + lane).checked_sub(view_offset)
                    };
                    let p = at(d.param, c.param_base, span.param_offset);
                    let g = at(d.grad, c.grad_base, span.grad_offset);
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
                    // Lanes past the segment's end are written back unchanged.
                    if !d.segmented || e + lane < end {
                        if let Some(g) = updated[p as usize] {
                            return Err(format!("element {p} updated twice (group {g})"));
                        }
                        updated[p as usize] = Some(group);
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
    /// lengths aligned to 4 or not, up to `groups` groups.
    fn random_span(rng: &mut Rng, max_tensors: u64, max_len: u64) -> (u64, u64, u64, Vec<Segment>) {
        let aligned = rng.below(2) == 0;
        let offset = |rng: &mut Rng| {
            let o = rng.below(40);
            if aligned { o / 4 * 4 } else { o }
        };
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
            // A gap, sometimes, keeping vec4 alignment where the span has it.
            if rng.below(3) == 0 {
                at += offset(rng);
            }
            if aligned {
                at = at.next_multiple_of(4);
            }
        }
        let len = at + offset(rng) * rng.below(2);
        (param_offset, grad_offset, len.max(1), segments)
    }

    fn random_limits(rng: &mut Rng) -> PlanLimits {
        let align = [16u64, 64, 256][rng.below(3) as usize];
        let workgroup_size = [1u32, 3, 64, 256][rng.below(4) as usize];
        let segmented_workgroup_size = workgroup_size.min(64);
        let granularity = granularity(align);
        PlanLimits {
            chunk_len: granularity * (1 + rng.below(64)),
            align,
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
            let limits = random_limits(&mut rng);
            let max_tensors = 1 + rng.below(300);
            let (param_offset, grad_offset, len, segments) =
                random_span(&mut rng, max_tensors, 3000);
            let span = SpanLayout {
                param_offset,
                grad_offset,
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
            let (param_offset, grad_offset, len, segments) = random_span(&mut rng, 40, 3 << 20);
            let span = SpanLayout {
                param_offset,
                grad_offset,
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
            len: 1600,
            segments: &segments,
        };
        let limits = PlanLimits {
            chunk_len: 1024,
            align: 16,
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
}
