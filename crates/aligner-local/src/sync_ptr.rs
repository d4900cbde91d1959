//! [`SyncPtr`]: one output buffer written by many rayon tasks at once, each task its own
//! elements.
//!
//! The matrix products and attention kernels (here and in `aligner-train`'s fused layers) split
//! their output by columns, heads or strided row blocks, so no task's part is a contiguous
//! sub-slice that `chunks_mut` could hand out. They share the buffer through this type instead:
//! it is the single place where a raw output pointer is made `Send` and `Sync`, so the safety
//! argument is written once, here, and each write site only has to show that its indices are
//! in bounds and its own.

// `unsafe` here: this module's purpose is the `Send`/`Sync` impls and the raw writes that the
// kernels' disjoint parallel output rests on.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::marker::PhantomData;

/// A buffer's base pointer and length that may be copied into tasks on other threads, which
/// then write disjoint elements of it.
///
/// It borrows the buffer mutably for `'a`, so the owner cannot read, move or free it while
/// any copy is alive; once the parallel loop that holds the copies returns, the owner has the
/// buffer back with every task's writes visible (rayon's join synchronizes).
///
/// # Contract
/// Creating and copying a `SyncPtr` is safe; every access through it is `unsafe`, and the
/// caller of each promises that:
/// 1. the element(s) it touches are inside the buffer (`index < len`; a pointer from
///    [`SyncPtr::add`] is only used for elements below `len`);
/// 2. while tasks run, no other task writes or reads those elements: each element has one
///    owning task, fixed by how the work was split (a column, a head, a block of rows);
/// 3. it does not read elements that have not been written yet when the buffer is a `Vec`'s
///    spare capacity ([`SyncPtr::spare_capacity`]).
pub struct SyncPtr<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: PhantomData<&'a mut [T]>,
}

impl<T> Clone for SyncPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SyncPtr<'_, T> {}

// SAFETY: a `SyncPtr` only hands out raw pointers and `unsafe` writes, whose callers promise
// (the contract above) that each element is touched by one task at a time, so sharing it
// across threads creates no data race by itself. `T: Send` because values written from a task
// end up owned by the buffer's owner on another thread.
unsafe impl<T: Send> Send for SyncPtr<'_, T> {}
// SAFETY: as for `Send`: `&SyncPtr` allows nothing a copy does not, and a copy only gives
// access under the contract.
unsafe impl<T: Send> Sync for SyncPtr<'_, T> {}

impl<'a, T> SyncPtr<'a, T> {
    /// Shares `buf` for the lifetime of the borrow.
    pub fn new(buf: &'a mut [T]) -> Self {
        SyncPtr {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// Shares the whole allocation of `buf`, its spare capacity included, for tasks that
    /// fill it before the owner calls `set_len` (no zeroing pass first). The elements are
    /// uninitialized until written.
    pub fn spare_capacity(buf: &'a mut Vec<T>) -> Self {
        SyncPtr {
            ptr: buf.as_mut_ptr(),
            len: buf.capacity(),
            _buf: PhantomData,
        }
    }

    /// Elements the pointer covers.
    pub fn len(self) -> usize {
        self.len
    }

    /// Whether it covers no element.
    pub fn is_empty(self) -> bool {
        self.len == 0
    }

    /// Pointer to element `offset`, for kernels that write through raw pointers (SIMD
    /// stores, `gemm`).
    ///
    /// # Safety
    /// `offset <= len`, and whatever is written through the result follows the contract on
    /// [`SyncPtr`] (in bounds, owned by the calling task).
    #[inline(always)]
    pub unsafe fn add(self, offset: usize) -> *mut T {
        debug_assert!(offset <= self.len, "offset {offset} past {}", self.len);
        // SAFETY: offset <= len (caller), so the result stays inside the borrowed allocation
        // or one past its end.
        unsafe { self.ptr.add(offset) }
    }

    /// Writes `value` at `index` (the old value, if any, is not dropped: buffers hold plain
    /// numbers or spare capacity).
    ///
    /// # Safety
    /// `index < len`, and the calling task owns element `index` (see [`SyncPtr`]).
    #[inline(always)]
    pub unsafe fn write(self, index: usize, value: T) {
        debug_assert!(index < self.len, "index {index} out of {}", self.len);
        // SAFETY: index < len, so the element is inside the borrowed buffer, and no other
        // task touches it while this one runs (both promised by the caller).
        unsafe { self.ptr.add(index).write(value) }
    }
}

#[cfg(test)]
mod tests {
    use super::SyncPtr;
    use rayon::prelude::*;

    #[test]
    fn tasks_writing_strided_columns_fill_the_buffer() {
        let (rows, cols) = (37, 11);
        let mut out = vec![0u32; rows * cols];
        let p = SyncPtr::new(&mut out);
        (0..cols).into_par_iter().for_each(|c| {
            for r in 0..rows {
                // SAFETY: r < rows and c < cols, so the index is below rows * cols; column c
                // belongs to this task alone.
                unsafe { p.write(r * cols + c, (r * 100 + c) as u32) };
            }
        });
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(out[r * cols + c], (r * 100 + c) as u32);
            }
        }
    }

    #[test]
    fn spare_capacity_covers_the_allocation() {
        let mut v: Vec<f32> = Vec::with_capacity(64);
        let p = SyncPtr::spare_capacity(&mut v);
        assert!(p.len() >= 64);
        (0..64usize).into_par_iter().for_each(|i| {
            // SAFETY: i < 64 <= capacity; each task writes only element i.
            unsafe { p.write(i, i as f32) };
        });
        // SAFETY: all 64 elements were written above.
        unsafe { v.set_len(64) };
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
    }
}
