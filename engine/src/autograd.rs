//! Reverse-mode autograd. The tape is the graph itself: every tensor made by an op that needs a
//! gradient holds a node (its inputs and its backward rule, which owns the state the forward saved;
//! see `op`). [`backward`] orders the graph once (depth-first, post-order) and walks it in
//! reverse, summing gradients that meet at a tensor (`add_into`: in place on the host). Dropping the loss frees the
//! graph and its buffers.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ops::add_into;
use crate::tensor::{no_grad, Grads, Tensor};

thread_local! {
    /// The walk's working sets, kept empty between calls so that a step allocates none anew.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    order: Vec<Tensor>,
    seen: HashSet<u64>,
    stack: Vec<(Tensor, bool)>,
    grads: HashMap<u64, Tensor>,
}

/// d loss / d leaf for every leaf created with [`Tensor::param`]. `loss` must have one element.
pub fn backward(loss: &Tensor) -> Result<Grads> {
    if loss.numel() != 1 {
        return Err(Error::Shape { op: "backward", msg: format!("loss must be a scalar, got shape {:?}", loss.shape()) });
    }
    if !loss.requires_grad() {
        return Err(Error::Invalid("backward: the loss does not depend on any parameter (or was made under no_grad)".into()));
    }
    let mut sc = SCRATCH.with(|s| s.take());
    let out = walk(loss, &mut sc);
    sc.order.clear();
    sc.seen.clear();
    sc.stack.clear();
    sc.grads.clear();
    SCRATCH.with(|s| *s.borrow_mut() = sc);
    out
}

fn walk(loss: &Tensor, sc: &mut Scratch) -> Result<Grads> {
    let Scratch { order, seen, stack, grads } = sc;
    // Post-order DFS without recursion.
    stack.push((loss.clone(), false));
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(node) = &t.0.node {
            for i in &node.inputs {
                if i.requires_grad() && !seen.contains(&i.id()) {
                    stack.push((i.clone(), false));
                }
            }
        }
    }
    no_grad(|| {
        grads.insert(loss.id(), Tensor::full(loss.shape(), 1.0, loss.device())?);
        let mut leaves: HashMap<u64, Tensor> = HashMap::new();
        for t in order.iter().rev() {
            let Some(node) = &t.0.node else {
                if let Some(g) = grads.remove(&t.id()) {
                    leaves.insert(t.id(), g);
                }
                continue;
            };
            let Some(g) = grads.remove(&t.id()) else {
                continue;
            };
            let outs = node.rule.grads(g)?;
            for (inp, gi) in node.inputs.iter().zip(outs) {
                let Some(gi) = gi else { continue };
                if !inp.requires_grad() {
                    continue;
                }
                if gi.shape() != inp.shape() {
                    return Err(Error::Shape {
                        op: node.op,
                        msg: format!("backward produced gradient {:?} for input {:?}", gi.shape(), inp.shape()),
                    });
                }
                let acc = match grads.remove(&inp.id()) {
                    Some(prev) => add_into(prev, &gi)?,
                    None => gi,
                };
                grads.insert(inp.id(), acc);
            }
        }
        Ok(Grads::new(leaves))
    })
}
