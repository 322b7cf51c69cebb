//! Checkpoints: safetensors files holding every parameter under its model name (see the README's
//! table), the Adam moments as `adam.m.NAME` / `adam.v.NAME`, and in the metadata the run's config,
//! the item-token order and the training position. Written atomically (temp file + rename), so an
//! interrupted run never leaves a half-written checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::engine::{Device, Tensor};
use crate::{Error, Result};

/// Save named tensors and string metadata.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: &BTreeMap<String, String>) -> Result<()> {
    let host: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.shape().to_vec(), bytemuck::cast_slice(&t.to_vec()?).to_vec())))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = host
        .iter()
        .map(|(n, s, b)| {
            Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Invalid(format!("tensor {n}: {e}")))?))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = meta.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Invalid(format!("serialising {}: {e}", path.display())))?;
    crate::files::write_atomic(path, &bytes)
}

/// A loaded checkpoint: tensors on the host, and the metadata.
pub struct Checkpoint {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: BTreeMap<String, String>,
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let bad = |e: safetensors::SafeTensorError| Error::Invalid(format!("{} is not a valid checkpoint: {e}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
    let mut tensors = HashMap::new();
    for (name, v) in st.tensors() {
        if v.dtype() != Dtype::F32 {
            return Err(Error::Invalid(format!("{}: tensor {name} has dtype {:?}, expected F32", path.display(), v.dtype())));
        }
        let data: Vec<f32> = bytemuck::pod_collect_to_vec(v.data());
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "{}: tensor {name} holds a non-finite value ({} at element {i}); a model with NaN or Inf weights cannot be used",
                path.display(),
                data[i]
            )));
        }
        tensors.insert(name.to_string(), (v.shape().to_vec(), data));
    }
    Ok(Checkpoint { tensors, meta })
}

impl Checkpoint {
    /// A tensor by name on `dev`, checking its shape.
    pub fn tensor(&self, name: &str, shape: &[usize], dev: Device) -> Result<Option<Tensor>> {
        match self.tensors.get(name) {
            None => Ok(None),
            Some((s, data)) => {
                if s != shape {
                    return Err(Error::Shape {
                        op: "checkpoint",
                        msg: format!("tensor {name} is {s:?} in the checkpoint, the model needs {shape:?}"),
                    });
                }
                Ok(Some(Tensor::from_vec(data.clone(), shape, dev)?))
            }
        }
    }

    /// Copy the checkpoint's values into `params` (in place). With `strict`, every parameter must be
    /// present; otherwise missing ones keep their values. Returns how many were loaded.
    pub fn load_into(&self, params: &[(String, Tensor)], strict: bool) -> Result<usize> {
        let mut n = 0;
        for (name, p) in params {
            match self.tensor(name, p.shape(), p.device())? {
                Some(t) => {
                    p.assign(&t)?;
                    n += 1;
                }
                None if strict => return Err(Error::Invalid(format!("checkpoint has no tensor '{name}'"))),
                None => {}
            }
        }
        Ok(n)
    }
}
