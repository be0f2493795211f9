//! The markdown table the harness prints.

use super::stats::{Samples, Unit};

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub unit: Unit,
    pub samples: Samples,
    /// The reference it is compared with, or what it counts.
    pub note: String,
}

/// Rows in the order they were measured, plus facts about the machine.
#[derive(Debug, Default)]
pub struct Table {
    pub machine: Vec<(String, String)>,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn add(
        &mut self,
        label: impl Into<String>,
        unit: Unit,
        samples: Samples,
        note: impl Into<String>,
    ) {
        self.rows.push(Row {
            label: label.into(),
            unit,
            samples,
            note: note.into(),
        });
    }

    /// The median of the row labelled `label`, if it was measured.
    pub fn median_of(&self, label: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.label == label)
            .and_then(|r| r.samples.median())
    }

    /// Appends `text` to the note of every row whose trimmed label is `label`
    /// (`prefix`: starts with it), after a "; " where the note has text already.
    pub fn append_note(&mut self, label: &str, prefix: bool, text: &str) {
        for r in &mut self.rows {
            let l = r.label.trim();
            if l == label.trim() || (prefix && l.starts_with(label.trim())) {
                if !r.note.is_empty() {
                    r.note.push_str("; ");
                }
                r.note.push_str(text);
            }
        }
    }

    /// Rows sorted by their leading number (stable: measuring order within a
    /// number), each indented `↳` row kept under the row before it.
    fn in_row_order(&self) -> Vec<&Row> {
        let mut groups: Vec<Vec<&Row>> = Vec::new();
        for r in &self.rows {
            match groups.last_mut() {
                Some(g) if r.label.trim_start().starts_with('↳') => g.push(r),
                _ => groups.push(vec![r]),
            }
        }
        groups.sort_by_key(|g| leading_number(&g[0].label));
        groups.into_iter().flatten().collect()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.machine {
            out.push_str(&format!("- {k}: {v}\n"));
        }
        out.push_str("\n| row | median | p90 | n | reference / note |\n|---|---:|---:|---:|---|\n");
        for r in self.in_row_order() {
            let show = |v: Option<f64>| v.map_or("–".to_owned(), |v| format_value(r.unit, v));
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.label,
                show(r.samples.median()),
                show(r.samples.p90()),
                r.samples.n(),
                r.note
            ));
        }
        out
    }
}

fn leading_number(label: &str) -> u32 {
    let digits: String = label.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(u32::MAX)
}

/// `value` in `unit`, with as many digits as are worth reading.
pub fn format_value(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Millis if value >= 1000.0 => format!("{:.2} s", value / 1000.0),
        Unit::Millis if value >= 10.0 => format!("{value:.0} ms"),
        Unit::Millis => format!("{value:.2} ms"),
        Unit::MiB => format!("{value:.1} MiB"),
        Unit::MiBps if value >= 10.0 => format!("{value:.0} MiB/s"),
        Unit::MiBps => format!("{value:.1} MiB/s"),
        Unit::Count if value.fract() == 0.0 => format!("{value:.0}"),
        Unit::Count => format!("{value:.1}"),
    }
}

/// `a / b` as "1.23×", or "–" without both.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        // Small ratios (a warm pool against a boot) keep a significant digit.
        (Some(a), Some(b)) if b > 0.0 && a / b < 0.1 => format!("{:.3}×", a / b),
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_in_readable_units() {
        assert_eq!(format_value(Unit::Millis, 2345.0), "2.35 s");
        assert_eq!(format_value(Unit::Millis, 123.4), "123 ms");
        assert_eq!(format_value(Unit::Millis, 0.456), "0.46 ms");
        assert_eq!(format_value(Unit::MiB, 240.04), "240.0 MiB");
        assert_eq!(format_value(Unit::MiBps, 141.4), "141 MiB/s");
        assert_eq!(format_value(Unit::MiBps, 1.26), "1.3 MiB/s");
        assert_eq!(format_value(Unit::Count, 4.0), "4");
        assert_eq!(format_value(Unit::Count, 4.5), "4.5");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(ratio(None, Some(2.0)), "–");
    }

    #[test]
    fn table_has_a_row_per_measure() {
        let mut t = Table::default();
        t.machine.push(("cores".into(), "2".into()));
        t.add("floor", Unit::Millis, Samples::from_values([1.0, 3.0]), "");
        t.add("empty", Unit::MiB, Samples::new(), "not measured");
        let md = t.render();
        assert!(md.contains("- cores: 2"));
        assert!(md.contains("| floor | 2.00 ms | 3.00 ms | 2 |  |"), "{md}");
        assert!(md.contains("| empty | – | – | 0 | not measured |"), "{md}");
        assert_eq!(t.median_of("floor"), Some(2.0));
    }

    #[test]
    fn notes_get_appended_to_matching_rows_only() {
        let mut t = Table::default();
        t.add("4. exec", Unit::Millis, Samples::new(), "");
        t.add("4. exec, peer", Unit::Millis, Samples::new(), "x");
        t.add("6. PSS, 1 pod", Unit::MiB, Samples::new(), "idle");
        t.add("   ↳ guest", Unit::MiB, Samples::new(), "of 256");
        t.add("6. PSS, 10 pods", Unit::MiB, Samples::new(), "");
        t.append_note("4. exec", false, "goal ≤ 2×");
        t.append_note("6. PSS", true, "goal ≤ 80 MiB");
        t.append_note("↳ guest", false, "goal ≤ 40 MiB");
        let notes: Vec<_> = t.rows.iter().map(|r| r.note.as_str()).collect();
        assert_eq!(
            notes,
            [
                "goal ≤ 2×",
                "x",
                "idle; goal ≤ 80 MiB",
                "of 256; goal ≤ 40 MiB",
                "goal ≤ 80 MiB"
            ]
        );
    }

    #[test]
    fn rows_sort_by_number_with_their_breakdown() {
        let mut t = Table::default();
        for label in [
            "1. a",
            "6. mem",
            "   ↳ guest",
            "2. run",
            "   ↳ net",
            "6. mem10",
        ] {
            t.add(label, Unit::Millis, Samples::new(), "");
        }
        let order: Vec<_> = t.in_row_order().iter().map(|r| r.label.trim()).collect();
        assert_eq!(
            order,
            ["1. a", "2. run", "↳ net", "6. mem", "↳ guest", "6. mem10"]
        );
    }
}
