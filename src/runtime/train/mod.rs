//! Training on the runtime: gradients, losses and optimizers over the same backends as the
//! forward. `docs/training.md` walks through it with an example.
//!
//! - [`backend`]: [`TrainBackend`], the ops training adds to [`crate::runtime::Backend`]
//!   (implemented for the CPU in `runtime/cpu_train.rs`).
//! - [`layers`]: every layer's forward-with-cache and backward (linear, LayerNorm, self-
//!   attention with projections, feed-forward, embeddings, dropout).
//! - [`bart`]: `BartForConditionalGeneration` (tied or untied) and its denoising loss and
//!   gradients, with dropout.
//! - [`bert_cls`]: `BertForSequenceClassification`, forward to logits and forward + backward
//!   to the loss and the gradient of every parameter by its Hugging Face name.
//! - [`bert_encoder`]: BERT's encoder (embeddings, layers, pooler) with its backward, shared
//!   by the trainable BERT models; [`StepOptions`].
//! - [`bert_pretrain`]: `BertForPreTraining`, the MLM + NSP loss and its gradients (tied
//!   decoder).
//! - [`optim`]: named parameters, gradients, AdamW, global-norm clipping.
//! - [`rnn_ops`]: the GRU step, the LSTM step and additive attention on host slices (the
//!   defaults of [`TrainBackend::gru_cell`], [`TrainBackend::lstm_cell`] and
//!   [`TrainBackend::additive_attention`]).

pub mod backend;
pub mod bart;
pub mod bert_cls;
pub mod bert_encoder;
pub mod bert_pretrain;
pub mod layers;
pub mod optim;
pub mod rnn_ops;

pub use backend::{
    AdamWStep, AttentionGrads, CrossEntropy, DropoutSite, LayerNormGrads, Op, TrainBackend,
};
pub use bart::{
    shift_tokens_right, BartForConditionalGeneration, DenoisingBatch, DenoisingOutput,
    DropoutSiteInfo, SkippedLayers,
};
pub use bert_cls::{BertForSequenceClassification, ClassifierConfig, Head, StepOutput};
pub use bert_encoder::StepOptions;
pub use bert_pretrain::{BertForPreTraining, PretrainingConfig, PretrainingOutput};
pub use optim::{AdamW, AdamWConfig, Gradients, Param};
pub use rnn_ops::{AdditiveGrads, GruCellGrads, LstmCellGrads};
