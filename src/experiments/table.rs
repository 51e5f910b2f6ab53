//! Figure data as tables: polars DataFrames written as Parquet and CSV beside each PNG.

use crate::error::{Result, TcaError};
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// Polars errors as harness errors naming the file.
pub fn pe(path: &Path) -> impl Fn(PolarsError) -> TcaError + '_ {
    move |e| TcaError::Format {
        path: path.into(),
        msg: e.to_string(),
    }
}

/// Writes `df` to `stem.parquet` and `stem.csv`; returns both paths.
pub fn write(stem: &Path, df: &mut DataFrame) -> Result<Vec<PathBuf>> {
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TcaError::io(dir, e))?;
    }
    let pq = stem.with_extension("parquet");
    let csv = stem.with_extension("csv");
    let f = std::fs::File::create(&pq).map_err(|e| TcaError::io(&pq, e))?;
    ParquetWriter::new(f).finish(df).map_err(pe(&pq))?;
    let mut f = std::fs::File::create(&csv).map_err(|e| TcaError::io(&csv, e))?;
    CsvWriter::new(&mut f)
        .include_header(true)
        .finish(df)
        .map_err(pe(&csv))?;
    Ok(vec![pq, csv])
}

/// Column `name` of `df` as f64 values (nulls as NaN).
pub fn f64s(df: &DataFrame, name: &str) -> Result<Vec<f64>> {
    let col = df.column(name).map_err(pe(Path::new(name)))?;
    let s = col.cast(&DataType::Float64).map_err(pe(Path::new(name)))?;
    Ok(s.f64()
        .map_err(pe(Path::new(name)))?
        .iter()
        .map(|x| x.unwrap_or(f64::NAN))
        .collect())
}

/// Column `name` of `df` as strings.
pub fn strs(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    let col = df.column(name).map_err(pe(Path::new(name)))?;
    let s = col.cast(&DataType::String).map_err(pe(Path::new(name)))?;
    Ok(s.str()
        .map_err(pe(Path::new(name)))?
        .iter()
        .map(|x| x.unwrap_or("").to_string())
        .collect())
}

/// Means of `values` per group of `keys` (groups in order of first appearance), with
/// polars' lazy group-by.
pub fn mean_by(df: DataFrame, keys: &[&str], values: &[&str]) -> PolarsResult<DataFrame> {
    let by: Vec<Expr> = keys.iter().map(|k| col(*k)).collect();
    let aggs: Vec<Expr> = values.iter().map(|v| col(*v).mean()).collect();
    df.lazy().group_by_stable(by).agg(aggs).collect()
}

/// A table built row by row: columns of f64/str/u64 values, turned into a DataFrame
/// at each write (a long run rewrites it after every row, leaving what it measured).
#[derive(Default)]
pub struct Table {
    names: Vec<String>,
    cols: Vec<Col>,
}

enum Col {
    F(Vec<f64>),
    S(Vec<String>),
    U(Vec<u64>),
}

pub enum Val {
    F(f64),
    S(String),
    U(u64),
}

impl Table {
    pub fn push<S: AsRef<str>>(&mut self, row: Vec<(S, Val)>) -> Result<()> {
        if self.names.is_empty() {
            for (n, v) in &row {
                self.names.push(n.as_ref().to_string());
                self.cols.push(match v {
                    Val::F(_) => Col::F(Vec::new()),
                    Val::S(_) => Col::S(Vec::new()),
                    Val::U(_) => Col::U(Vec::new()),
                });
            }
        }
        if row.len() != self.names.len() {
            return Err(TcaError::Shape("table row of another width".into()));
        }
        for ((_, v), c) in row.into_iter().zip(&mut self.cols) {
            match (v, c) {
                (Val::F(x), Col::F(c)) => c.push(x),
                (Val::S(x), Col::S(c)) => c.push(x),
                (Val::U(x), Col::U(c)) => c.push(x),
                _ => return Err(TcaError::Shape("table column of another type".into())),
            }
        }
        Ok(())
    }

    pub fn write(&self, stem: &Path) -> Result<()> {
        let cols: Vec<Column> = self
            .names
            .iter()
            .zip(&self.cols)
            .map(|(n, c)| match c {
                Col::F(v) => Column::new(n.as_str().into(), v),
                Col::S(v) => Column::new(n.as_str().into(), v),
                Col::U(v) => Column::new(n.as_str().into(), v),
            })
            .collect();
        let height = cols.first().map_or(0, |c| c.len());
        let mut df = DataFrame::new(height, cols).map_err(pe(stem))?;
        write(stem, &mut df)?;
        Ok(())
    }
}
