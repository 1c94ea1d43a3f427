//! The report: Markdown tables, and an SVG plot of latency against offered load.

use crate::measure::{Figures, ms};

pub const FIGURES_HEADER: &str = "| scenario | operations | per second | p50 ms | p90 ms | p99 ms | max ms | errors | answers |\n\
     | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";

pub fn figures_row(figures: &Figures) -> String {
    format!(
        "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
        figures.scenario,
        figures.operations,
        figures.per_second(),
        ms(figures.percentile(0.50)),
        ms(figures.percentile(0.90)),
        ms(figures.percentile(0.99)),
        ms(figures.max()),
        figures.errors(),
        figures.outcomes_text(),
    )
}

pub fn ratio(value: f64, baseline: f64) -> String {
    if baseline > 0.0 {
        format!("{:.1} %", 100.0 * value / baseline)
    } else {
        "–".into()
    }
}

/// Latency percentiles (log scale) against offered load, one line per percentile.
pub fn latency_plot(points: &[(f64, &Figures)]) -> String {
    let (width, height, left, bottom, top, right) = (640.0, 360.0, 70.0, 50.0, 30.0, 150.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let max_load = points.iter().map(|(load, _)| *load).fold(1.0, f64::max);
    let ms_of = |f: &Figures, p: f64| (f.percentile(p).as_secs_f64() * 1000.0).max(0.1);
    let max_ms = points
        .iter()
        .map(|(_, f)| ms_of(f, 1.0))
        .fold(1.0, f64::max);
    let (log_min, log_max) = (0.1f64.log10(), max_ms.log10().ceil().max(1.0));
    let x = |load: f64| left + plot_w * load / max_load;
    let y = |ms: f64| top + plot_h * (1.0 - (ms.log10() - log_min) / (log_max - log_min));
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">command → visible in the view, open loop</text>\n"
    );
    // Axes, and a grid line per decade.
    svg += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        top + plot_h,
        left + plot_w,
        top + plot_h,
        top + plot_h
    );
    let mut decade = log_min.ceil() as i32;
    while f64::from(decade) <= log_max {
        let value = 10f64.powi(decade);
        let yy = y(value);
        svg += &format!(
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{value} ms</text>\n",
            left + plot_w,
            left - 6.0,
            yy + 4.0
        );
        decade += 1;
    }
    for (load, _) in points {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{load}</text>\n",
            x(*load),
            top + plot_h + 16.0
        );
    }
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">offered load, orders/s</text>\n",
        left + plot_w / 2.0,
        height - 10.0
    );
    for (index, (p, name, colour)) in [
        (0.5, "p50", "#1b9e77"),
        (0.9, "p90", "#d95f02"),
        (0.99, "p99", "#7570b3"),
        (1.0, "max", "#e7298a"),
    ]
    .into_iter()
    .enumerate()
    {
        let path: Vec<String> = points
            .iter()
            .map(|(load, f)| format!("{:.1},{:.1}", x(*load), y(ms_of(f, p))))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        );
        for point in &path {
            let (px, py) = point.split_once(',').expect("x,y");
            svg += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{colour}\"/>\n");
        }
        let legend_y = top + 16.0 * index as f64;
        svg += &format!(
            "<line x1=\"{}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{colour}\" stroke-width=\"2\"/>\n\
             <text x=\"{}\" y=\"{}\">{name}</text>\n",
            left + plot_w + 16.0,
            left + plot_w + 36.0,
            left + plot_w + 42.0,
            legend_y + 4.0
        );
    }
    svg += "</svg>\n";
    svg
}
