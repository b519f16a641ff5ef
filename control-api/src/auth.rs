//! The control plane's token: read from a file, carried as `authorization: Bearer <token>`.

use std::path::Path;

/// Reads a token file (surrounding whitespace trimmed); `None` in, `None` out.
pub fn read_token_file(path: Option<&Path>) -> Result<Option<String>, String> {
    path.map(|p| {
        std::fs::read_to_string(p)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("{}: {e}", p.display()))
    })
    .transpose()
}

/// Adds `authorization: Bearer <token>` to `req` when there is a token.
pub fn authorize<T>(req: &mut tonic::Request<T>, token: Option<&str>) -> Result<(), String> {
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_string())?;
        req.metadata_mut().insert("authorization", value);
    }
    Ok(())
}
