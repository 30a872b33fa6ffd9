//! Flame graphs of the ferry sidecars (`ferry-bench --flamegraph`): `perf script` output folded
//! into one line per distinct stack ("root;…;leaf count", the format Brendan Gregg's
//! flamegraph.pl, inferno and speedscope read), and an SVG drawn from it. Pure functions; the
//! recording itself is in `mod.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Stacks and their sample counts, root first, frames joined by `;`.
pub type Folded = BTreeMap<String, u64>;

/// Fold `perf script` output (a header line per sample, then one indented line per frame, leaf
/// first: `addr symbol+0xoff (dso)`). Each stack is rooted at the process name; frames perf
/// could not name keep their DSO (`[unknown] (libc.so.6)` becomes `[libc.so.6]`). The process
/// start-up frames under `main` (and an outermost frame the unwinder could not name) are left
/// out, so every stack of the proxy starts at the same place.
pub fn fold(script: &str) -> Folded {
    let mut out = Folded::new();
    let mut comm: Option<&str> = None;
    let mut frames: Vec<String> = Vec::new();
    let mut flush = |comm: Option<&str>, frames: &mut Vec<String>| {
        if let Some(c) = comm {
            let mut stack = vec![c.to_owned()];
            let outermost_kept = frames
                .iter()
                .rposition(|f| !is_startup(f))
                .map_or(0, |i| i + 1);
            stack.extend(frames.drain(..outermost_kept).rev());
            *out.entry(stack.join(";")).or_insert(0) += 1;
        }
        frames.clear();
    };
    for line in script.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            flush(comm, &mut frames);
            comm = line.split_whitespace().next();
            continue;
        }
        frames.push(frame_name(line.trim()));
    }
    flush(comm, &mut frames);
    out
}

/// Frames every stack of a process shares below its own code.
fn is_startup(frame: &str) -> bool {
    matches!(
        frame,
        "[unknown]" | "_start" | "__libc_start_main" | "__libc_start_call_main" | "main"
    ) || frame.starts_with("__libc_start_main")
        || frame.starts_with("std::rt::lang_start")
        || frame.starts_with("std::sys::backtrace::__rust_begin_short_backtrace")
        || frame.starts_with("core::ops::function::FnOnce::call_once")
}

/// `ffffffff8163085a kfree+0x8a ([kernel.kallsyms])` → `kfree [k]`.
fn frame_name(line: &str) -> String {
    let rest = line.split_once(' ').map_or(line, |(_, r)| r);
    let (sym, dso) = match rest.rfind(" (") {
        Some(i) => (&rest[..i], rest[i + 2..].trim_end_matches(')')),
        None => (rest, ""),
    };
    let sym = match sym.rfind("+0x") {
        Some(i) => &sym[..i],
        None => sym,
    };
    // `;` separates frames in the folded format.
    let sym = sym.replace(';', ":");
    if dso == "[kernel.kallsyms]" {
        format!("{sym} [k]")
    } else if sym == "[unknown]" {
        match dso.rsplit('/').next() {
            Some(file) if !file.is_empty() && !file.starts_with('[') => format!("[{file}]"),
            _ => "[unknown]".to_owned(),
        }
    } else {
        sym
    }
}

/// The folded stacks as text, one per line.
pub fn folded_text(f: &Folded) -> String {
    f.iter().fold(String::new(), |mut s, (stack, n)| {
        let _ = writeln!(s, "{stack} {n}");
        s
    })
}

/// A node of the merged call tree.
#[derive(Default)]
struct Node {
    samples: u64,
    children: BTreeMap<String, Node>,
}

const WIDTH: f64 = 1200.0;
const ROW: f64 = 16.0;
const TOP: f64 = 40.0;
/// Frames narrower than this many pixels are not drawn (their samples still count above).
const MIN_WIDTH: f64 = 0.3;

/// Draw the folded stacks as an SVG flame graph (root at the bottom, width = share of
/// samples; hover a frame for its name, samples and share). Kernel frames are orange, the
/// proxy's and libraries' red-yellow.
pub fn svg(f: &Folded, title: &str) -> String {
    let mut root = Node::default();
    for (stack, &n) in f {
        root.samples += n;
        let mut at = &mut root;
        for frame in stack.split(';') {
            at = at.children.entry(frame.to_owned()).or_default();
            at.samples += n;
        }
    }
    let depth = max_depth(&root);
    let height = TOP + (depth as f64 + 1.0) * ROW + 10.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"Verdana, sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#f8f8f8\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <text x=\"10\" y=\"34\" fill=\"#555\">{} samples; width = share of the sidecars' CPU samples; hover a frame for its numbers</text>\n",
        WIDTH / 2.0,
        escape(title),
        root.samples
    );
    if root.samples > 0 {
        let scale = (WIDTH - 20.0) / root.samples as f64;
        let canvas = Canvas {
            height,
            scale,
            total: root.samples,
        };
        draw(&mut s, &canvas, "all", &root, 10.0, 0);
    }
    s.push_str("</svg>\n");
    s
}

fn max_depth(n: &Node) -> usize {
    n.children
        .values()
        .map(|c| 1 + max_depth(c))
        .max()
        .unwrap_or(0)
}

/// The drawing's fixed measures: its height, pixels per sample, samples in all.
struct Canvas {
    height: f64,
    scale: f64,
    total: u64,
}

fn draw(s: &mut String, c: &Canvas, name: &str, n: &Node, x: f64, level: usize) {
    let Canvas {
        height,
        scale,
        total,
    } = *c;
    let w = n.samples as f64 * scale;
    if w < MIN_WIDTH {
        return;
    }
    let y = height - 10.0 - (level as f64 + 1.0) * ROW;
    let share = 100.0 * n.samples as f64 / total as f64;
    let _ = writeln!(
        s,
        "<g><title>{} ({} samples, {share:.2}%)</title><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\" rx=\"2\"/>{}</g>",
        escape(name),
        n.samples,
        ROW - 1.0,
        color(name),
        label(name, x, y, w)
    );
    let mut cx = x;
    // Widest first reads better than alphabetical, and is stable for equal counts.
    let mut kids: Vec<(&String, &Node)> = n.children.iter().collect();
    kids.sort_by(|a, b| b.1.samples.cmp(&a.1.samples).then(a.0.cmp(b.0)));
    for (child, node) in kids {
        draw(s, c, child, node, cx, level + 1);
        cx += node.samples as f64 * scale;
    }
}

/// The frame's name cut to what fits (about 7 px a character), or nothing.
fn label(name: &str, x: f64, y: f64, w: f64) -> String {
    let fits = ((w - 6.0) / 7.0).floor();
    if fits < 3.0 {
        return String::new();
    }
    let fits = fits as usize;
    let text: String = if name.chars().count() > fits {
        name.chars()
            .take(fits.saturating_sub(2))
            .chain("..".chars())
            .collect()
    } else {
        name.to_owned()
    };
    format!(
        "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
        x + 3.0,
        y + ROW - 4.5,
        escape(&text)
    )
}

fn color(name: &str) -> String {
    // FNV-1a: a stable shade per name.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let v = (h % 1000) as f64 / 1000.0;
    if name.ends_with(" [k]") {
        format!(
            "rgb(230,{},{})",
            140 + (v * 50.0) as u8,
            40 + (v * 30.0) as u8
        )
    } else {
        format!(
            "rgb({},{},{})",
            205 + (v * 50.0) as u8,
            80 + (v * 130.0) as u8,
            55 + (v * 20.0) as u8
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
ferry-proxy 29198 41066.003121:    2004008 cpu-clock: 
\tffffffff8163085a kfree+0x8a ([kernel.kallsyms])
\t           fde60 __GI___writev+0x10 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t          3ed1b8 hyper::proto::h1::io::Buffered<T,B>::poll_flush+0x708 (/x/ferry-proxy)
\t          30dad6 ferry_proxy::main+0xa046 (/x/ferry-proxy)
\t          30dad7 std::sys::backtrace::__rust_begin_short_backtrace+0x6 (/x/ferry-proxy)
\t          30dad8 main+0x6 (/x/ferry-proxy)
\t           29d90 __libc_start_call_main+0x80 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t           29e40 __libc_start_main@@GLIBC_2.34+0x80 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t          30dad9 _start+0x25 (/x/ferry-proxy)

ferry-proxy 29198 41066.005121:    2004008 cpu-clock: 
\t          3ed1b8 hyper::proto::h1::io::Buffered<T,B>::poll_flush+0x708 (/x/ferry-proxy)
\t          30dad6 ferry_proxy::main+0xa046 (/x/ferry-proxy)
\t  7ffd1932fea8 [unknown] ([unknown])

ferry-proxy 29199 41066.006121:    2004008 cpu-clock: 
\t          3ed1b8 hyper::proto::h1::io::Buffered<T,B>::poll_flush+0x708 (/x/ferry-proxy)
\t          30dad6 ferry_proxy::main+0xa046 (/x/ferry-proxy)

ferry-proxy 29199 41066.007121:    2004008 cpu-clock: 
\t          12345 [unknown] (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t          30dad6 ferry_proxy::main+0xa046 (/x/ferry-proxy)
";

    #[test]
    fn perf_script_folds_root_first_with_counts() {
        let f = fold(SCRIPT);
        let text = folded_text(&f);
        assert_eq!(
            text,
            "ferry-proxy;ferry_proxy::main;[libc.so.6] 1\n\
             ferry-proxy;ferry_proxy::main;hyper::proto::h1::io::Buffered<T,B>::poll_flush 2\n\
             ferry-proxy;ferry_proxy::main;hyper::proto::h1::io::Buffered<T,B>::poll_flush;__GI___writev;kfree [k] 1\n"
        );
    }

    #[test]
    fn the_svg_has_a_frame_per_node_with_its_share() {
        let f = fold(SCRIPT);
        let svg = svg(&f, "h1-max <ferry>");
        // Nodes: all, ferry-proxy, main, [libc.so.6], poll_flush, writev, kfree.
        assert_eq!(svg.matches("<rect x=").count(), 7, "{svg}");
        assert!(svg.contains("<title>all (4 samples, 100.00%)</title>"));
        assert!(svg.contains(
            "<title>hyper::proto::h1::io::Buffered&lt;T,B&gt;::poll_flush (3 samples, 75.00%)</title>"
        ));
        assert!(svg.contains("<title>kfree [k] (1 samples, 25.00%)</title>"));
        assert!(svg.contains("h1-max &lt;ferry&gt;"), "the title is escaped");
        // The root spans the drawing width (1180 px = 4 samples); a quarter is 295 px.
        assert!(svg.contains("width=\"1180.0\""));
        assert!(svg.contains("width=\"295.0\""));
    }

    #[test]
    fn nothing_recorded_is_an_empty_graph_not_a_panic() {
        let f = fold("");
        assert!(f.is_empty());
        let svg = svg(&f, "empty");
        assert!(svg.contains("0 samples"));
        assert_eq!(svg.matches("<rect x=").count(), 0);
    }
}
