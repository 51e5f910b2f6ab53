//! The principal axes of a KV head's keys, for box bounds in a basis where the keys'
//! spread is concentrated (a query's large components along directions in which the
//! keys hardly vary then cost nothing).
//!
//! V [d, d] holds the eigenvectors of the keys' covariance (cyclic Jacobi, columns);
//! q . k = (V^T q) . (V^T k) - q^T E k with E = V V^T - I, so a bound on the rotated
//! logits plus eps ||q||_2 ||k||_2 bounds the original ones, where
//! eps = ||E||_F + 8 (d + 4) sqrt(d) 2^-52 also covers the rounding of V^T q, V^T k and of
//! the original logit (each below (d + 2) sqrt(d) 2^-53 (1 + ||E||) ||q|| ||k||).

use ndarray::{Array2, ArrayView1, ArrayView2, Axis};

/// An orthogonal basis (up to rounding, which `eps` covers) for one KV head's keys.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// Eigenvectors as columns.
    v: Array2<f64>,
    /// ||V V^T - I||_F plus the rounding allowance (see the module docs).
    eps: f64,
}

impl Rotation {
    /// Principal axes of the rows of `k` [L, d]: O(L d^2 + sweeps d^3).
    pub fn principal_axes(k: ArrayView2<'_, f64>) -> Self {
        let (l, d) = k.dim();
        let mean = k
            .mean_axis(Axis(0))
            .unwrap_or_else(|| ndarray::Array1::zeros(d));
        let c = &k - &mean.insert_axis(Axis(0));
        let cov = c.t().dot(&c) / l.max(1) as f64;
        let v = jacobi_eigenvectors(cov);
        let e = v.dot(&v.t()) - Array2::<f64>::eye(d);
        let fro = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        let df = d as f64;
        Rotation {
            v,
            eps: fro + 8.0 * (df + 4.0) * df.sqrt() * f64::EPSILON,
        }
    }

    /// V^T x for each row x of `k` [L, d].
    pub fn rotate_rows(&self, k: ArrayView2<'_, f64>) -> Array2<f64> {
        k.dot(&self.v)
    }

    /// V^T q.
    pub fn rotate(&self, q: ArrayView1<'_, f64>) -> ndarray::Array1<f64> {
        q.dot(&self.v)
    }

    /// The allowance eps: |q . k - (V^T q) . (V^T k)| <= eps ||q|| ||k|| as computed.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

/// Eigenvectors (columns) of the symmetric matrix `a` by cyclic Jacobi rotations, until
/// the off-diagonal mass is below 1e-13 of the total (at most 30 sweeps). Any orthogonal
/// result is sound for the bounds; convergence only makes them tighter.
fn jacobi_eigenvectors(mut a: Array2<f64>) -> Array2<f64> {
    let d = a.nrows();
    let mut v = Array2::<f64>::eye(d);
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _ in 0..30 {
        let mut off = 0.0;
        for p in 0..d {
            for q in p + 1..d {
                off += 2.0 * a[[p, q]] * a[[p, q]];
            }
        }
        if off <= 1e-26 * total || total == 0.0 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[[p, q]];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[[q, q]] - a[[p, p]]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..d {
                    let (arp, arq) = (a[[r, p]], a[[r, q]]);
                    a[[r, p]] = c * arp - s * arq;
                    a[[r, q]] = s * arp + c * arq;
                }
                for r in 0..d {
                    let (apr, aqr) = (a[[p, r]], a[[q, r]]);
                    a[[p, r]] = c * apr - s * aqr;
                    a[[q, r]] = s * apr + c * aqr;
                }
                for r in 0..d {
                    let (vrp, vrq) = (v[[r, p]], v[[r, q]]);
                    v[[r, p]] = c * vrp - s * vrq;
                    v[[r, q]] = s * vrp + c * vrq;
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn jacobi_diagonalises_and_stays_orthogonal() {
        let a = array![[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]];
        let v = jacobi_eigenvectors(a.clone());
        let d = v.t().dot(&a).dot(&v);
        for p in 0..3 {
            for q in 0..3 {
                if p != q {
                    assert!(d[[p, q]].abs() < 1e-12, "{d:?}");
                }
            }
        }
        let e = v.dot(&v.t()) - Array2::<f64>::eye(3);
        assert!(e.iter().all(|x| x.abs() < 1e-14));
    }

    #[test]
    fn keys_along_one_axis_rotate_onto_one_coordinate() {
        // Keys vary only along (1, 1) / sqrt 2: after rotation one coordinate is constant.
        let k = array![[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0], [0.5, 0.5]];
        let r = Rotation::principal_axes(k.view());
        let kr = r.rotate_rows(k.view());
        let spread = |c: usize| {
            let col = kr.column(c);
            col.fold(f64::NEG_INFINITY, |m, &x| m.max(x))
                - col.fold(f64::INFINITY, |m, &x| m.min(x))
        };
        assert!(spread(0).min(spread(1)) < 1e-12);
        assert!(r.eps() < 1e-12);
    }
}
