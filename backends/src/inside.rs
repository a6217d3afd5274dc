//! Looking inside the model: what an engine captures at a decode (each decoder layer's output
//! and attention weights) and the lens head that turns a layer's output into logits.
//!
//! The engines only copy tensors out of their forward pass; turning them into distributions
//! and summaries is the `logitprobe` crate's work, the same for every engine.
//!
//! ```
//! use logitprobe_backends::inside::{FinalNorm, LensHead};
//! use ndarray::array;
//!
//! // A 2-token vocabulary over a 2-wide residual stream, RMSNorm with unit weights.
//! let head = LensHead::new(
//!     FinalNorm::Rms { weight: vec![1.0, 1.0], eps: 0.0 },
//!     array![[1.0, 0.0], [0.0, 1.0]],
//! )
//! .unwrap();
//! let logits = head.logits(array![[3.0, 4.0]].view());
//! // rms([3, 4]) = sqrt(12.5): the row is scaled to unit mean square.
//! assert!((logits[[0, 0]] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
//! ```

use ndarray::{Array1, Array2, ArrayView2, Axis};

/// The decoder's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    /// Decoder layers (blocks).
    pub n_layer: usize,
    /// Query heads per layer.
    pub n_head: usize,
    /// Key/value heads per layer (fewer than `n_head` under grouped-query attention).
    pub n_head_kv: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
}

/// Which decoder layers to read at each decode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureSpec {
    /// Layers whose output (the residual stream after the layer) is copied, ascending.
    pub hidden_layers: Vec<usize>,
    /// Layers whose attention weights are copied, ascending.
    pub attention_layers: Vec<usize>,
    /// Whether to copy the output head's input (the final norm's output) of each logits row:
    /// what [`LensHead::head_logits`] turns back into that row's logits, so a row can be kept
    /// in `n_embd` values instead of `n_vocab`.
    pub head_input: bool,
    /// Graph tensors copied whole by their names in llama.cpp's graph (`Qcur-0`, `kq-0`,
    /// `kqv_out-0`, `ffn_out-0` ...): for looking at one operation (f32 tensors only).
    pub named: Vec<String>,
}

impl CaptureSpec {
    /// Nothing to read: capture is off.
    pub fn is_empty(&self) -> bool {
        self.hidden_layers.is_empty()
            && self.attention_layers.is_empty()
            && !self.head_input
            && self.named.is_empty()
    }

    /// The first layer asked for that the model does not have.
    pub fn check(&self, n_layer: usize) -> Result<(), crate::Error> {
        for (part, layers) in [
            (crate::InsidePart::LogitLens, &self.hidden_layers),
            (crate::InsidePart::Attention, &self.attention_layers),
        ] {
            if let Some(&layer) = layers.iter().find(|&&l| l >= n_layer) {
                return Err(crate::Error::LayerOutOfRange {
                    part,
                    layer,
                    n_layer,
                });
            }
        }
        Ok(())
    }
}

/// What one logits row's position looked like inside the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Captured {
    /// `[hidden_layers.len(), n_embd]`: the output of each asked layer at this position.
    pub hidden: Option<Array2<f32>>,
    /// One `[n_head, position + 1]` array per asked attention layer: this position's query
    /// over the positions so far (weights of each head sum to 1). Only for the last row of
    /// a sequence in a decode (the row a step samples from); empty for the others.
    pub attention: Vec<Array2<f32>>,
    /// `[n_embd]`: the output head's input at this position, when asked.
    pub head_input: Option<Vec<f32>>,
    /// The named tensors asked for, each whole (all rows of the decode, ggml's layout), on
    /// the first row of each decode only; `None` where the graph had no such f32 tensor.
    pub named: Vec<Option<Vec<f32>>>,
}

/// The model's final norm before its output head.
#[derive(Debug, Clone, PartialEq)]
pub enum FinalNorm {
    /// `x / sqrt(mean(x²) + eps) * weight` (llama, qwen, gemma, phi3, mistral ...).
    Rms { weight: Vec<f32>, eps: f32 },
    /// `(x - mean) / sqrt(var + eps) * weight + bias` (ONNX's LayerNormalization).
    Layer {
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        eps: f32,
    },
}

/// An output head's matrix, `[n_vocab, n_embd]`: an engine may keep it as its own kernels
/// read it (llama.cpp's quantized rows), so the lens computes what the engine computes.
pub trait HeadMatrix: Send + Sync + std::fmt::Debug {
    fn n_vocab(&self) -> usize;
    fn n_embd(&self) -> usize;
    /// Bytes the matrix holds.
    fn bytes(&self) -> usize;
    /// `x` (`[n, n_embd]`) times the matrix transposed: `[n, n_vocab]`.
    fn product(&self, x: ArrayView2<'_, f32>) -> Array2<f32>;
}

impl HeadMatrix for Array2<f32> {
    fn n_vocab(&self) -> usize {
        self.nrows()
    }
    fn n_embd(&self) -> usize {
        self.ncols()
    }
    fn bytes(&self) -> usize {
        self.len() * 4
    }
    fn product(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        // One matrix product for every row (the head is read once per call, not per layer),
        // its vocabulary split across the CPU's threads: the engine waits meanwhile.
        let mut out = Array2::zeros((x.nrows(), self.nrows()));
        split_vocab(self.nrows(), &mut out, |range, mut part| {
            part.assign(&x.dot(&self.slice(ndarray::s![range, ..]).t()));
        });
        out
    }
}

/// Calls `f(rows, out[.., rows])` for a split of `0..n_vocab` into one range per CPU thread,
/// each on its own thread.
pub fn split_vocab(
    n_vocab: usize,
    out: &mut Array2<f32>,
    f: impl Fn(std::ops::Range<usize>, ndarray::ArrayViewMut2<'_, f32>) + Sync,
) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
        .min(n_vocab.div_ceil(1024).max(1));
    let per = n_vocab.div_ceil(threads);
    let mut parts = Vec::with_capacity(threads);
    let mut rest = out.view_mut();
    let mut start = 0;
    while start < n_vocab {
        let end = (start + per).min(n_vocab);
        let (part, tail) = rest.split_at(Axis(1), end - start);
        parts.push((start..end, part));
        rest = tail;
        start = end;
    }
    std::thread::scope(|s| {
        for (range, part) in parts {
            let f = &f;
            s.spawn(move || f(range, part));
        }
    });
}

/// The final norm and the output head: a layer's output through them is that layer's
/// logit-lens logits; the last layer's are the model's own logits.
#[derive(Debug)]
pub struct LensHead {
    norm: FinalNorm,
    head: Box<dyn HeadMatrix>,
    bias: Option<Array1<f32>>,
    /// Multiplies the logits (granite divides by its logit scale; command-r multiplies).
    scale: f32,
    /// `cap * tanh(logits / cap)` (gemma2, and gemma3 models that set it).
    softcap: Option<f32>,
}

impl LensHead {
    /// A head of `head` (`[n_vocab, n_embd]`) after `norm`; the widths must agree.
    pub fn new(norm: FinalNorm, head: impl HeadMatrix + 'static) -> Result<Self, crate::Error> {
        let width = match &norm {
            FinalNorm::Rms { weight, .. } => weight.len(),
            FinalNorm::Layer { weight, bias, .. } => {
                if bias.as_ref().is_some_and(|b| b.len() != weight.len()) {
                    return Err(crate::Error::LensHeadUnreadable {
                        reason: "the final norm's bias and weight differ in width".into(),
                    });
                }
                weight.len()
            }
        };
        if width != head.n_embd() {
            return Err(crate::Error::LensHeadUnreadable {
                reason: format!(
                    "the final norm is {width} wide but the output head takes {}",
                    head.n_embd()
                ),
            });
        }
        Ok(LensHead {
            norm,
            head: Box::new(head),
            bias: None,
            scale: 1.0,
            softcap: None,
        })
    }

    /// Adds the output head's bias (`[n_vocab]`).
    pub fn with_bias(mut self, bias: Vec<f32>) -> Result<Self, crate::Error> {
        if bias.len() != self.head.n_vocab() {
            return Err(crate::Error::LensHeadUnreadable {
                reason: format!(
                    "the output bias has {} entries for {} vocabulary rows",
                    bias.len(),
                    self.head.n_vocab()
                ),
            });
        }
        self.bias = Some(Array1::from(bias));
        Ok(self)
    }

    /// Multiplies the logits by `scale`.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Soft-caps the logits at `cap`.
    pub fn with_softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Width of the residual stream the head takes.
    pub fn n_embd(&self) -> usize {
        self.head.n_embd()
    }

    /// Rows of logits the head gives (the model's logits width).
    pub fn n_vocab(&self) -> usize {
        self.head.n_vocab()
    }

    /// Bytes the head holds (the output matrix, mostly).
    pub fn bytes(&self) -> usize {
        self.head.bytes()
    }

    /// The final norm of each row of `hidden` (`[n, n_embd]`).
    pub fn normalize(&self, hidden: ArrayView2<f32>) -> Array2<f32> {
        let mut x = hidden.to_owned();
        for mut row in x.axis_iter_mut(Axis(0)) {
            let n = row.len() as f64;
            match &self.norm {
                FinalNorm::Rms { weight, eps } => {
                    // As ggml's rms_norm: squares in f32 summed in f64, the scale in f32.
                    let ss: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
                    let scale = 1.0 / ((ss / n) as f32 + eps).sqrt();
                    for (v, w) in row.iter_mut().zip(weight) {
                        *v = *v * scale * w;
                    }
                }
                FinalNorm::Layer { weight, bias, eps } => {
                    let mean: f64 = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                    let var: f64 = row
                        .iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>()
                        / n;
                    let scale = 1.0 / (var as f32 + eps).sqrt();
                    for (i, v) in row.iter_mut().enumerate() {
                        let b = bias.as_ref().map_or(0.0, |b| b[i]);
                        *v = (*v - mean as f32) * scale * weight[i] + b;
                    }
                }
            }
        }
        x
    }

    /// The logits (`[n, n_vocab]`) of each row of `hidden` (`[n, n_embd]`): final norm,
    /// output head, bias, scale and soft cap, as the model applies them to its last layer.
    pub fn logits(&self, hidden: ArrayView2<f32>) -> Array2<f32> {
        self.head_logits(self.normalize(hidden).view())
    }

    /// The logits (`[n, n_vocab]`) of rows that have been through the final norm already
    /// (captured head inputs): output head, bias, scale and soft cap.
    pub fn head_logits(&self, normed: ArrayView2<f32>) -> Array2<f32> {
        let mut y = self.head.product(normed);
        if let Some(b) = &self.bias {
            y += b;
        }
        if self.scale != 1.0 {
            y *= self.scale;
        }
        if let Some(cap) = self.softcap {
            y.mapv_inplace(|v| cap * (v / cap).tanh());
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn rms_norm_then_head_then_bias_scale_and_cap() {
        let head = LensHead::new(
            FinalNorm::Rms {
                weight: vec![2.0, 0.5],
                eps: 1e-6,
            },
            array![[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
        )
        .unwrap()
        .with_bias(vec![0.0, 1.0, 0.0])
        .unwrap()
        .with_scale(0.5)
        .with_softcap(30.0);
        let h = array![[1.0f32, -1.0], [2.0, 2.0]];
        let y = head.logits(h.view());
        for (r, row) in h.outer_iter().enumerate() {
            let ms = (row[0] * row[0] + row[1] * row[1]) / 2.0;
            let s = 1.0 / (ms + 1e-6).sqrt();
            let x = [row[0] * s * 2.0, row[1] * s * 0.5];
            let want = [x[0], x[1] + 1.0, x[0] + x[1]].map(|v| 30.0 * (v * 0.5 / 30.0).tanh());
            for c in 0..3 {
                assert!((y[[r, c]] - want[c]).abs() < 1e-6, "{r},{c}");
            }
        }
    }

    #[test]
    fn layer_norm_subtracts_the_mean() {
        let head = LensHead::new(
            FinalNorm::Layer {
                weight: vec![1.0, 1.0],
                bias: Some(vec![0.5, 0.0]),
                eps: 0.0,
            },
            array![[1.0, 0.0]],
        )
        .unwrap();
        let y = head.logits(array![[3.0f32, 1.0]].view());
        // mean 2, var 1: (3 - 2) / 1 + 0.5
        assert!((y[[0, 0]] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn widths_must_agree_and_layers_must_exist() {
        assert!(LensHead::new(
            FinalNorm::Rms {
                weight: vec![1.0; 3],
                eps: 0.0
            },
            Array2::zeros((4, 2))
        )
        .is_err());
        let spec = CaptureSpec {
            hidden_layers: vec![0, 29],
            attention_layers: vec![30],
            ..CaptureSpec::default()
        };
        assert!(matches!(
            spec.check(30),
            Err(crate::Error::LayerOutOfRange {
                part: crate::InsidePart::Attention,
                layer: 30,
                n_layer: 30
            })
        ));
        assert!(spec.check(31).is_ok());
    }
}
