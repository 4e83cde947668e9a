use fibecfed_benches::*;
use fibecfed_lora::LoraConfig;
use fibecfed_transformer::{Adapter, NoHook, Reduction, cross_entropy};
use ndarray::{Array2, linalg::general_mat_mul, s};
fn main() {
    let (model, _) = minilm();
    let lora = LoraConfig::new(8, 16.0, &["query", "value"]);
    let params = lora_params(&model, &lora);
    let (batch, labels) = synthetic_batch(&model.config, 16, 64, 7);
    let ad = Adapter {
        params: &params,
        scale: 2.0,
    };
    let f = median_seconds(5, || {
        std::hint::black_box(model.forward(&batch, ad, None).unwrap());
    });
    let e = median_seconds(5, || {
        std::hint::black_box(model.encode(&batch, None).unwrap());
    });
    let fwd = model.forward(&batch, ad, None).unwrap();
    let (_, d) = cross_entropy(&fwd.logits, &labels, Reduction::Mean).unwrap();
    let b = median_seconds(5, || {
        std::hint::black_box(model.backward(&batch, ad, &fwd, &d, &mut NoHook).unwrap());
    });
    println!(
        "forward(record) {:.1} ms, encode {:.1} ms, backward {:.1} ms",
        f * 1e3,
        e * 1e3,
        b * 1e3
    );
    // GEMM pieces
    let x = Array2::<f32>::ones((1024, 384));
    let w = Array2::<f32>::ones((1536, 384));
    let mut y = Array2::<f32>::zeros((1024, 1536));
    let g = median_seconds(10, || general_mat_mul(1.0, &x, &w.t(), 0.0, &mut y));
    println!(
        "1024x384 @ 384x1536: {:.2} ms = {:.1} GFLOP/s",
        g * 1e3,
        2.0 * 1024.0 * 384.0 * 1536.0 / g / 1e9
    );
    let q = Array2::<f32>::ones((1024, 384));
    let mut sc = Array2::<f32>::zeros((64, 64));
    let a = median_seconds(10, || {
        for bi in 0..16 {
            for h in 0..12 {
                let qh = q.slice(s![bi * 64..(bi + 1) * 64, h * 32..(h + 1) * 32]);
                general_mat_mul(1.0, &qh, &qh.t(), 0.0, &mut sc);
            }
        }
    });
    let mut big = Array2::<f32>::from_shape_fn((1024, 1536), |(i, j)| {
        ((i * 7 + j * 3) % 100) as f32 / 50.0 - 1.0
    });
    let ge = median_seconds(10, || {
        big.mapv_inplace(|v| {
            use fibecfed_lora::Real;
            let c = 0.5 * (1.0 + (v * 0.70710677).erf());
            v * c
        })
    });
    println!("gelu 1.57M: {:.2} ms", ge * 1e3);
    let ex = median_seconds(10, || {
        big.mapv_inplace(|v| {
            use fibecfed_lora::Real;
            (v * 0.001).fast_exp()
        })
    });
    println!("exp 1.57M: {:.2} ms", ex * 1e3);
    let xx = Array2::<f32>::ones((1024, 384));
    let cl = median_seconds(10, || {
        std::hint::black_box(xx.clone());
    });
    println!("clone 1024x384: {:.3} ms", cl * 1e3);
    let z = median_seconds(10, || {
        std::hint::black_box(Array2::<f32>::zeros((1024, 1536)));
    });
    println!("zeros 1024x1536: {:.3} ms", z * 1e3);
    println!(
        "192 attention score GEMMs: {:.2} ms = {:.1} GFLOP/s",
        a * 1e3,
        192.0 * 2.0 * 64.0 * 64.0 * 32.0 / a / 1e9
    );
}
#[allow(dead_code)]
fn unused() {}
