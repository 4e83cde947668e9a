use fibecfed_benches::*;
use ndarray::{Array2, Axis, linalg::general_mat_mul, s};
unsafe extern "C" { fn openblas_set_num_threads(n: i32); }
fn main() {
    let _ = minilm(); // links
    unsafe { openblas_set_num_threads(1) };
    let x = Array2::<f32>::ones((1024, 384)); let w = Array2::<f32>::ones((1536, 384)); let mut y = Array2::<f32>::zeros((1024,1536));
    let g = median_seconds(10, || general_mat_mul(1.0, &x, &w.t(), 0.0, &mut y));
    println!("single: {:.2} ms", g*1e3);
    let g2 = median_seconds(10, || {
        let (mut y1, mut y2) = y.view_mut().split_at(Axis(0), 512);
        rayon::join(|| general_mat_mul(1.0, &x.slice(s![..512, ..]), &w.t(), 0.0, &mut y1),
                    || general_mat_mul(1.0, &x.slice(s![512.., ..]), &w.t(), 0.0, &mut y2));
    });
    println!("rayon 2 halves: {:.2} ms", g2*1e3);
    let g3 = median_seconds(10, || {
        let (mut y1, mut y2) = y.view_mut().split_at(Axis(0), 512);
        std::thread::scope(|sc| { sc.spawn(|| general_mat_mul(1.0, &x.slice(s![..512, ..]), &w.t(), 0.0, &mut y1));
            general_mat_mul(1.0, &x.slice(s![512.., ..]), &w.t(), 0.0, &mut y2); });
    });
    println!("scope 2 halves: {:.2} ms", g3*1e3);
    let half = median_seconds(10, || { let mut y1 = y.slice_mut(s![..512, ..]); general_mat_mul(1.0, &x.slice(s![..512, ..]), &w.t(), 0.0, &mut y1) });
    println!("one half alone: {:.2} ms; rayon threads {}", half*1e3, rayon::current_num_threads());
}
