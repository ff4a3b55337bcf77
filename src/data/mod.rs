//! Training-data transforms: BART's noising functions ([`noise`]) and BERT's masked-LM
//! corruption ([`mlm`]).

pub mod mlm;
pub mod noise;
