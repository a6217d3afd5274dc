//! `logitprobe tokenize`: ids and pieces of a text; with two models, where they differ.

use crate::cli::TokenizeArgs;
use logitprobe::hub::infer_backend;
use logitprobe::text::Pieces;
use logitprobe_backends::LogitSource;

pub fn run(args: &TokenizeArgs, verbose: bool) -> anyhow::Result<()> {
    let mut sources: Vec<(String, Box<dyn LogitSource>)> = Vec::new();
    for m in &args.model {
        let backend = infer_backend(m, args.backend.map(Into::into));
        let resolved = logitprobe::hub::resolve(backend, m, args.model_file.as_deref())?;
        sources.push((
            m.clone(),
            logitprobe_backends::open(backend, &resolved.path, &args.engine.options(verbose)?)?,
        ));
    }
    if sources.is_empty() || sources.len() > 2 {
        return Err(logitprobe_backends::usage!(
            "give one --model, or two to compare their tokenizations"
        ));
    }
    let mut all = Vec::new();
    for (name, src) in &sources {
        let add_bos = args.add_bos.unwrap_or(src.info().add_bos);
        let ids = src.tokenize(&args.text, add_bos, args.special)?;
        let mut pieces = Pieces::default();
        let shown: Vec<String> = ids.iter().map(|&id| pieces.get(&**src, id)).collect();
        println!("{name}: {} tokens", ids.len());
        for (id, p) in ids.iter().zip(&shown) {
            println!("  {id:>8}  {p:?}");
        }
        all.push(ids);
    }
    if let [a, b] = &all[..] {
        match a
            .iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .or((a.len() != b.len()).then(|| a.len().min(b.len())))
        {
            None => println!("the two tokenizations are identical"),
            Some(i) => println!(
                "the tokenizations differ from token {i}: {:?} vs {:?}",
                &a[i..a.len().min(i + 5)],
                &b[i..b.len().min(i + 5)]
            ),
        }
    }
    Ok(())
}
