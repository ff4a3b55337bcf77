//! Sentence embeddings on the CPU with a sentence-transformers folder, and their cosine
//! similarities.
//!
//!     cargo run --release --example 01_embed_sentences [MODEL_DIR]
//!
//! MODEL_DIR defaults to models/all-MiniLM-L6-v2 (`make minilm` fetches it).

use cuattn::runtime::pooling::cosine;
use cuattn::runtime::sentence::SentenceEmbedder;
use cuattn::runtime::Cpu;

fn main() -> cuattn::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/all-MiniLM-L6-v2".into());
    if !std::path::Path::new(&dir)
        .join("model.safetensors")
        .exists()
    {
        println!("{dir} has no model.safetensors: run `make minilm` or pass a model folder");
        return Ok(());
    }
    let model = SentenceEmbedder::from_folder(&Cpu, std::path::Path::new(&dir))?;
    let sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A monkey is playing drums.",
    ];
    // Batches of 32; the closure hears how many sentences are done after each batch.
    let out = model.embed(&Cpu, &sentences, 32, |_| {})?;
    println!("{} vectors of {} values", out.vectors.len(), out.dim);
    for (i, a) in sentences.iter().enumerate() {
        for (j, b) in sentences.iter().enumerate().skip(i + 1) {
            let c = cosine(&out.vectors[i], &out.vectors[j]);
            println!("{c:6.3}  {a:?} / {b:?}");
        }
    }
    Ok(())
}
