//! `effdet-tools` holds the dataset converter binaries (`create_coco_tfrecord`), thin
//! command-line fronts over `effdet_pipeline::coco`, with automl's flag names.

/// A progress bar styled the same way in every tool.
pub fn progress_bar(total: u64, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
        ))
        .expect("valid template"),
    );
    bar
}
