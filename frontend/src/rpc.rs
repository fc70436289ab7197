//! Line-delimited JSON-RPC 2.0 over the inherited Unix listener.

use jsonrpsee::{Methods, RpcModule};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Every method the API serves.
pub fn methods() -> Methods {
    RpcModule::new(()).into()
}

pub async fn serve(listener: UnixListener, methods: Methods) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let methods = methods.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok((resp, _)) = methods.raw_json_request(&line, 1).await else {
                    break;
                };
                let mut out = resp.get().to_string();
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
