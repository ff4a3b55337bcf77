//! Helpers shared by the GPU tests that capture CUDA graphs (`embedding`, `layer_graph`).

use cuattn::gpu::DeviceTensor;
use cuattn::HostTensor;

/// Fills `t` with NaN, so an element a kernel does not write fails the finite checks.
pub(crate) fn nan_poison(t: &mut DeviceTensor) {
    let n: usize = t.shape().iter().product();
    let host = HostTensor::from_f32(t.dtype(), t.shape(), &vec![f32::NAN; n]).unwrap();
    t.write(&host).unwrap();
}

/// `got` bit-equal to `want` element by element, and never NaN.
pub(crate) fn assert_finite_and_equal(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() && !g.is_nan(),
            "{what}[{i}]: replay {g}, ordinary call {w}"
        );
    }
}

/// The node types of a captured graph: (kernels, memory allocations).
pub(crate) fn kernel_and_alloc_nodes(graph: &cudarc::driver::CudaGraph) -> (usize, usize) {
    use cudarc::driver::sys::{self, CUgraphNodeType};
    let mut n = 0usize;
    // SAFETY: a live graph; with a null array the call only writes the node count.
    let r = unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut n) };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    let mut nodes = vec![std::ptr::null_mut(); n];
    // SAFETY: `nodes` has room for the n handles the call writes.
    let r = unsafe { sys::cuGraphGetNodes(graph.cu_graph(), nodes.as_mut_ptr(), &mut n) };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    let (mut kernels, mut allocs) = (0, 0);
    for node in nodes.into_iter().take(n) {
        let mut ty = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: a node of the live graph; the call writes one node type.
        let r = unsafe { sys::cuGraphNodeGetType(node, &mut ty) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        match ty {
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => kernels += 1,
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => allocs += 1,
            _ => {}
        }
    }
    (kernels, allocs)
}
