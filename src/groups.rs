//! Assigning tensors to parameter groups by name.
//!
//! Owns: name patterns. May not touch configs or the GPU.

/// The names BERT (and HuggingFace's examples) exclude from weight decay, matched as
/// substrings: `any(nd in name for nd in no_decay)`.
pub const BERT_NO_DECAY: [&str; 3] = ["bias", "LayerNorm.weight", "LayerNorm.bias"];

/// Whether `name` contains any of `patterns`.
pub fn matches_any(name: &str, patterns: &[&str]) -> bool {
    patterns.iter().any(|p| name.contains(p))
}

/// The group of each name: `no_decay_group` where the name matches one of `patterns`,
/// `decay_group` otherwise. With [`BERT_NO_DECAY`] and a second group whose `weight_decay` is 0
/// this is BERT's optimizer set-up.
pub fn weight_decay_groups<'a>(
    names: impl IntoIterator<Item = &'a str>,
    patterns: &[&str],
    decay_group: usize,
    no_decay_group: usize,
) -> Vec<usize> {
    names
        .into_iter()
        .map(|n| {
            if matches_any(n, patterns) {
                no_decay_group
            } else {
                decay_group
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_names_split_as_huggingface_does() {
        let names = [
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.bias",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.self.query.bias",
            "classifier.weight",
        ];
        assert_eq!(
            weight_decay_groups(names, &BERT_NO_DECAY, 0, 1),
            [0, 1, 1, 0, 1, 0]
        );
    }
}
